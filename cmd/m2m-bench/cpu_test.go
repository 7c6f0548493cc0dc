package main

import (
	"syscall"
	"testing"
)

// TestMinorFaults: touching fresh pages shows in minorFaults and in the
// cpu report, and pageFaultCost measures something.
func TestMinorFaults(t *testing.T) {
	const pages = 256
	b, err := syscall.Mmap(-1, 0, pages*4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		t.Skip("mmap:", err)
	}
	defer syscall.Munmap(b)
	before := cpuReport().MinFlt
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	if got := cpuReport().MinFlt - before; got < pages {
		t.Fatalf("%d minor faults counted for %d fresh pages touched", got, pages)
	}
	if c := pageFaultCost(); c <= 0 {
		t.Fatalf("pageFaultCost = %v", c)
	}
}

package main

import (
	"syscall"
	"time"
)

// processCPU is the CPU time (user + system, all threads) this process has
// used so far. A broker's CPU per connect is its capacity: the connect rate
// it sustains when it, not the load generator, is what runs out of CPU.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// CPUReport is the answer of `serve` to the "cpu" command.
type CPUReport struct {
	CPUNs int64 `json:"cpu_ns"` // processCPU of the broker process
}

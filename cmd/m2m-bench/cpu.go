package main

import (
	"errors"
	"os"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/m2mguard/m2mguard/internal/stats"
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

// gcCPU is the runtime's estimate of the CPU time its garbage collector has
// used so far (mark assists, dedicated and idle mark workers, pauses).
func gcCPU() time.Duration {
	s := []metrics.Sample{{Name: "/cpu/classes/gc/total:cpu-seconds"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindFloat64 {
		return 0
	}
	return time.Duration(s[0].Value.Float64() * 1e9)
}

// minorFaults is the number of minor page faults this process has taken
// so far: first touches of memory the kernel maps then (fresh goroutine
// stacks and heap). On some virtual machines each costs several
// microseconds, a share of the CPU per connect worth knowing.
func minorFaults() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Minflt
}

// pageFaultCost measures what a minor page fault costs on this machine,
// in microseconds: the time to touch each 4 KiB page of 64 MiB of fresh
// anonymous memory once (the median of three tries), 0 if it cannot map
// memory. A connection costs the broker a dozen of them (goroutine
// stacks, buffers), so this sets much of its CPU per connect: about
// 0.3 µs on bare metal, well over 10 µs on some virtual machines.
func pageFaultCost() float64 {
	const size, page = 64 << 20, 4096
	var tries []float64
	for range 3 {
		b, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
		if err != nil {
			return 0
		}
		start := time.Now()
		for i := 0; i < size; i += page {
			b[i] = 1
		}
		tries = append(tries, float64(time.Since(start).Nanoseconds())/1e3/(size/page))
		syscall.Munmap(b)
	}
	return stats.Median(tries)
}

// CPUReport is the answer of `serve` to the "cpu" command.
type CPUReport struct {
	CPUNs  int64  `json:"cpu_ns"`       // processCPU of the broker process
	GCNs   int64  `json:"gc_ns"`        // gcCPU: the share of it the garbage collector used
	NumGC  uint32 `json:"num_gc"`       // GC cycles so far
	MinFlt int64  `json:"minor_faults"` // minorFaults of the broker process
}

func cpuReport() CPUReport {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return CPUReport{CPUNs: int64(processCPU()), GCNs: int64(gcCPU()), NumGC: ms.NumGC, MinFlt: minorFaults()}
}

// cpuProfile is one running CPU profile (pprof allows one at a time),
// started by a --cpuprofile flag or by the profile-start command of serve.
type cpuProfile struct{ f *os.File }

func (p *cpuProfile) start(path string) error {
	if p.f != nil {
		return errors.New("a profile is already running")
	}
	if path == "" {
		return errors.New("profile-start needs a file name")
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return err
	}
	p.f = f
	return nil
}

func (p *cpuProfile) stop() error {
	if p.f == nil {
		return nil
	}
	pprof.StopCPUProfile()
	err := p.f.Close()
	p.f = nil
	return err
}

// answer is a command's JSON answer: {"ok":true} or {"error":"..."}.
func answer(err error) map[string]any {
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	return map[string]any{"ok": true}
}

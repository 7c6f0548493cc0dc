package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"
)

// procMem is what /proc/<pid>/status says about a process's memory.
type procMem struct {
	RSS int64 // VmRSS: resident now, bytes
	HWM int64 // VmHWM: the most it was ever resident, bytes
}

// errNoRSS: the status file has no VmRSS line (a zombie, or not Linux).
var errNoRSS = errors.New("no VmRSS in /proc status")

// maxStatusLen bounds what parseStatus reads: the status file of a Linux
// process is about 1.5 KiB.
const maxStatusLen = 64 << 10

// readMem reads /proc/<pid>/status.
func readMem(pid int) (procMem, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return procMem{}, err
	}
	return parseStatus(data)
}

// parseStatus reads the VmRSS and VmHWM lines ("VmRSS:\t  16384 kB") of a
// /proc/<pid>/status file. VmRSS is required; a missing VmHWM is 0.
func parseStatus(data []byte) (procMem, error) {
	if len(data) > maxStatusLen {
		return procMem{}, fmt.Errorf("proc status: longer than %d bytes", maxStatusLen)
	}
	var m procMem
	haveRSS := false
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		name, value, ok := bytes.Cut(sc.Bytes(), []byte(":"))
		if !ok {
			continue
		}
		var dst *int64
		switch string(name) {
		case "VmRSS":
			dst, haveRSS = &m.RSS, true
		case "VmHWM":
			dst = &m.HWM
		default:
			continue
		}
		n, err := parseKB(value)
		if err != nil {
			return procMem{}, fmt.Errorf("proc status %s: %w", name, err)
		}
		*dst = n
	}
	if err := sc.Err(); err != nil {
		return procMem{}, fmt.Errorf("proc status: %w", err)
	}
	if !haveRSS {
		return procMem{}, errNoRSS
	}
	return m, nil
}

// parseKB parses "   16384 kB" into bytes.
func parseKB(v []byte) (int64, error) {
	num, unit, _ := bytes.Cut(bytes.TrimSpace(v), []byte(" "))
	if string(bytes.TrimSpace(unit)) != "kB" {
		return 0, errors.New(`want "<n> kB"`)
	}
	n, err := strconv.ParseInt(string(num), 10, 64)
	if err != nil || n < 0 || n > 1<<40 {
		return 0, errors.New(`want "<n> kB" with 0 <= n <= 2^40`)
	}
	return n << 10, nil
}

// memWatch samples a process's resident memory every interval, keeps the
// peak and calls over (once) when it passes limit. Stop ends its goroutine
// and waits for it.
type memWatch struct {
	pid   int
	limit int64

	over func(rss int64)

	mu       sync.Mutex
	last     int64
	peak     int64
	exceeded bool

	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
}

// watchMem starts sampling pid. over runs, in the goroutine that took the
// sample, the first time the resident set passes limit (0 = no limit).
func watchMem(pid int, limit int64, interval time.Duration, over func(rss int64)) *memWatch {
	w := &memWatch{pid: pid, limit: limit, over: over, stop: make(chan struct{}), done: make(chan struct{})}
	w.sample()
	go func() {
		defer close(w.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-t.C:
				w.sample()
			}
		}
	}()
	return w
}

func (w *memWatch) sample() {
	m, err := readMem(w.pid)
	if err != nil {
		return // the process has exited: keep the last figures
	}
	w.mu.Lock()
	w.last = m.RSS
	w.peak = max(w.peak, m.RSS)
	fire := w.limit > 0 && m.RSS > w.limit && !w.exceeded
	if fire {
		w.exceeded = true
	}
	w.mu.Unlock()
	if fire && w.over != nil {
		w.over(m.RSS)
	}
}

// resetPeak starts a new peak from the current sample and returns it.
func (w *memWatch) resetPeak() int64 {
	w.sample()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.peak = w.last
	return w.last
}

// now samples once more and returns the resident set and the peak since
// resetPeak (the last figures if the process has exited).
func (w *memWatch) now() (rss, peak int64) {
	w.sample()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.last, w.peak
}

// Stop ends the sampling goroutine and waits for it. Safe to call twice.
func (w *memWatch) Stop() {
	w.stopOnce.Do(func() { close(w.stop) })
	<-w.done
}

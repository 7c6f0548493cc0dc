// Package testwait waits, in tests, for something another goroutine, a
// server or a child process makes true: it polls a condition with a short
// back-off instead of sleeping a fixed time, and fails the test, naming what
// it waited for, when a generous timeout passes first.
//
//	testwait.For(t, 10*time.Second, "the session is listed", func() bool {
//		return e.listed("T1")
//	})
//
// A timeout here is a bound on a hang, not a measurement: pass one that a
// loaded machine meets with room to spare. A test that must see that
// something does not happen watches it for a while with Never. A package
// whose parallel tests mostly wait runs more of them at a time with
// SetParallel in its TestMain.
package testwait

import (
	"flag"
	"runtime"
	"strconv"
	"testing"
	"time"
)

// The back-off between two polls: the first comes after firstPoll, each
// later one after twice the pause before, up to maxPoll. Conditions that
// hold at once cost almost nothing; slow ones are polled 50 times a second.
const (
	firstPoll = time.Millisecond
	maxPoll   = 20 * time.Millisecond
)

// For polls cond until it returns true. If timeout passes first, it fails t
// with t.Fatalf naming what. Call it from the test's goroutine (Fatalf
// stops that goroutine only); elsewhere use Until.
func For(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if !Until(timeout, cond) {
		t.Fatalf("not within %v: %s", timeout, what)
	}
}

// Until polls cond until it returns true or timeout passes, and reports
// whether it returned true. cond is called at least once, and once more
// when timeout has passed. For a test that reports a timeout itself, with
// what it saw, or that waits outside the test's goroutine.
func Until(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for pause := firstPoll; ; pause = min(2*pause, maxPoll) {
		if cond() {
			return true
		}
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		time.Sleep(min(pause, left))
	}
}

// Never polls cond for the whole of d and fails t with t.Fatalf naming
// what as soon as it returns true. It is an observation window, not a
// wait: the test spends d on purpose, to give what must not happen the
// time to happen.
func Never(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	if Until(d, cond) {
		t.Fatalf("within %v: %s", d, what)
	}
}

// SetParallel makes perCPU times GOMAXPROCS the number of parallel tests
// (t.Parallel) that run at a time, unless the command line set it
// (-parallel). Call it from TestMain before m.Run, in a package whose
// parallel tests spend most of their time waiting — for brokers, Vault or
// NATS servers, child processes, timers — rather than computing: go test's
// default, GOMAXPROCS, is meant for tests that compute, and leaves a small
// machine idle while such tests wait one or two at a time.
func SetParallel(perCPU int) {
	if !flag.Parsed() {
		flag.Parse()
	}
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		if err := flag.Set("test.parallel", strconv.Itoa(perCPU*runtime.GOMAXPROCS(0))); err != nil {
			panic("testwait: not in a test binary: " + err.Error())
		}
	}
}

package testwait

import (
	"flag"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// recorder is a testing.TB that records Fatalf instead of stopping the
// goroutine.
type recorder struct {
	testing.TB
	failed string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
}

func TestFor(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		trueFrom int // the call from which cond holds; 0: never
		timeout  time.Duration
		fail     string
	}{
		{"holds at once", 1, time.Minute, ""},
		{"holds after polls", 5, time.Minute, ""},
		{"never holds", 0, 30 * time.Millisecond, "not within 30ms: the thing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var calls int
			r := &recorder{TB: t}
			For(r, tc.timeout, "the thing", func() bool {
				calls++
				return tc.trueFrom > 0 && calls >= tc.trueFrom
			})
			if r.failed != tc.fail {
				t.Errorf("failed with %q, want %q", r.failed, tc.fail)
			}
			if tc.trueFrom > 0 && calls != tc.trueFrom {
				t.Errorf("cond called %d times, want %d: polling went on after it held", calls, tc.trueFrom)
			}
		})
	}
}

// TestUntilChecksAgainAtTheDeadline: a condition that comes true while the
// last pause runs is seen, and a false one is asked once more at the end.
func TestUntilChecksAgainAtTheDeadline(t *testing.T) {
	t.Parallel()
	const timeout = 50 * time.Millisecond
	start := time.Now()
	var last atomic.Int64
	if Until(timeout, func() bool { last.Store(int64(time.Since(start))); return false }) {
		t.Fatal("Until reported a false condition as true")
	}
	if got := time.Duration(last.Load()); got < timeout {
		t.Fatalf("last call %v after the start, before the timeout %v", got, timeout)
	}
}

func TestNever(t *testing.T) {
	t.Parallel()
	r := &recorder{TB: t}
	Never(r, 20*time.Millisecond, "it happened", func() bool { return false })
	if r.failed != "" {
		t.Fatalf("a condition that stayed false failed the test: %s", r.failed)
	}
	var calls int
	Never(r, time.Minute, "it happened", func() bool { calls++; return calls == 3 })
	if !strings.Contains(r.failed, "it happened") || calls != 3 {
		t.Fatalf("failed %q after %d calls, want a failure naming it after 3", r.failed, calls)
	}
}

// TestSetParallel: the default of -parallel changes, a value given on the
// command line stays.
func TestSetParallel(t *testing.T) {
	f := flag.Lookup("test.parallel")
	given := false
	flag.Visit(func(v *flag.Flag) { given = given || v == f })
	before := f.Value.String()
	defer f.Value.Set(before)
	SetParallel(3)
	want := strconv.Itoa(3 * runtime.GOMAXPROCS(0))
	if given {
		want = before
	}
	if got := f.Value.String(); got != want {
		t.Fatalf("-parallel %s after SetParallel(3), want %s (given on the command line: %v)", got, want, given)
	}
}

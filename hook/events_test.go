package hook

import (
	"reflect"
	"sync/atomic"
	"testing"
	"time"
)

func TestEventLimiter(t *testing.T) {
	t0 := time.Unix(1_800_000_000, 0)
	type call struct {
		name string
		at   time.Duration // after t0
		want bool
	}
	tests := []struct {
		name    string
		rate    int
		calls   []call
		drained []suppressedCount
	}{
		{"the first event of a kind always passes", 1, []call{
			{"login_refused", 0, true}, {"control_refused", 0, true}, {"envelope_refused", 0, true},
		}, nil},
		{"a burst of rate passes, then the rest is counted", 3, []call{
			{"login_refused", 0, true}, {"login_refused", 0, true}, {"login_refused", 0, true},
			{"login_refused", 0, false}, {"login_refused", 10 * time.Millisecond, false},
		}, []suppressedCount{{"login_refused", 2}}},
		{"tokens come back at rate per second", 2, []call{
			{"login_refused", 0, true}, {"login_refused", 0, true}, {"login_refused", 0, false},
			{"login_refused", 500 * time.Millisecond, true}, {"login_refused", 500 * time.Millisecond, false},
			{"login_refused", 10 * time.Second, true}, {"login_refused", 10 * time.Second, true},
		}, []suppressedCount{{"login_refused", 2}}},
		{"names are capped apart", 1, []call{
			{"login_refused", 0, true}, {"login_refused", 0, false},
			{"control_refused", 0, true}, {"control_refused", 0, false}, {"control_refused", 0, false},
		}, []suppressedCount{{"control_refused", 2}, {"login_refused", 1}}},
		{"names not capped always pass", 1, []call{
			{"login_accepted", 0, true}, {"login_accepted", 0, true}, {"change_committed", 0, true},
		}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := newEventLimiter(tc.rate, floodEvents...)
			for i, c := range tc.calls {
				if got := l.allow(c.name, t0.Add(c.at)); got != c.want {
					t.Errorf("call %d (%s at +%s): allow %v, want %v", i, c.name, c.at, got, c.want)
				}
			}
			if got := l.drain(); !reflect.DeepEqual(got, tc.drained) {
				t.Errorf("drain: %v, want %v", got, tc.drained)
			}
			if again := l.drain(); again != nil {
				t.Errorf("second drain: %v, want nothing (drain resets)", again)
			}
		})
	}
}

// TestSpawnAfterStop: Stop waits for the goroutines spawned before it and
// refuses new ones.
func TestSpawnAfterStop(t *testing.T) {
	h := &Hook{crew: newCrew()}
	release := make(chan struct{})
	var finished atomic.Bool
	if !h.crew.spawn(func() { <-release; finished.Store(true) }) {
		t.Fatal("spawn refused before Stop")
	}
	stopped := make(chan struct{})
	go func() { h.Stop(); close(stopped) }()
	close(release)
	<-stopped
	if !finished.Load() {
		t.Fatal("Stop returned before the spawned goroutine finished")
	}
	if h.crew.ctx.Err() == nil {
		t.Fatal("Stop did not cancel the hook's context")
	}
	if h.crew.spawn(func() {}) {
		t.Fatal("spawn accepted after Stop")
	}
}

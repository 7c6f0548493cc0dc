package hook

import (
	"sync"
	"time"
)

// ThrottleOptions configure the back-off of repeated login failures for one
// identity (terminal sn or application name) from one source address.
// Failures from one address never slow the same identity from another.
type ThrottleOptions struct {
	Free       int           // failures answered at once before refusals start; 0 = 5
	Delay      time.Duration // extra wait before answering each failure up to Free; 0 = none
	Base       time.Duration // first refusal period; doubles with every further failure; 0 = 1 s
	Max        time.Duration // longest refusal period; 0 = 15 min
	MaxEntries int           // (identity, address) pairs remembered; 0 = 100000
}

func (o ThrottleOptions) withDefaults() ThrottleOptions {
	if o.Free <= 0 {
		o.Free = 5
	}
	if o.Base <= 0 {
		o.Base = time.Second
	}
	if o.Max <= 0 {
		o.Max = 15 * time.Minute
	}
	if o.MaxEntries <= 0 {
		o.MaxEntries = 100000
	}
	return o
}

type throttleKey struct{ id, addr string }

type throttleEntry struct {
	failures int
	until    time.Time // refused until then
	last     time.Time
}

type throttle struct {
	opts ThrottleOptions
	mu   sync.Mutex
	m    map[throttleKey]*throttleEntry
}

func newThrottle(o ThrottleOptions) *throttle {
	return &throttle{opts: o, m: make(map[throttleKey]*throttleEntry)}
}

// blocked reports whether the pair is in a refusal period.
func (t *throttle) blocked(k throttleKey, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[k]
	return e != nil && now.Before(e.until)
}

// fail records a failure and returns how long to wait before answering.
func (t *throttle) fail(k throttleKey, now time.Time) time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[k]
	if e == nil {
		if len(t.m) >= t.opts.MaxEntries {
			t.sweep(now)
		}
		e = &throttleEntry{}
		t.m[k] = e
	}
	e.failures++
	e.last = now
	if over := e.failures - t.opts.Free; over >= 0 {
		period := t.opts.Base << min(over, 30)
		if period > t.opts.Max || period <= 0 {
			period = t.opts.Max
		}
		e.until = now.Add(period)
		return 0
	}
	return t.opts.Delay * time.Duration(e.failures)
}

// succeed forgets the pair's failures.
func (t *throttle) succeed(k throttleKey) {
	t.mu.Lock()
	delete(t.m, k)
	t.mu.Unlock()
}

// sweep drops pairs that are no longer refused and idle for Max; if the map
// is still full, it drops the pairs with the fewest failures. Called with
// mu held.
func (t *throttle) sweep(now time.Time) {
	for k, e := range t.m {
		if now.After(e.until) && now.Sub(e.last) > t.opts.Max {
			delete(t.m, k)
		}
	}
	for k, e := range t.m {
		if len(t.m) < t.opts.MaxEntries {
			return
		}
		if e.failures < t.opts.Free {
			delete(t.m, k)
		}
	}
}

type replayKey struct {
	sn    string
	nonce uint64
}

// replayCache remembers the (sn, nonce) pairs accepted within the window,
// i.e. twice the allowed skew: a replay older than that fails the skew
// check. Only verified logins are added, so its size is bounded by the
// number of genuine logins in the window.
type replayCache struct {
	window time.Duration
	mu     sync.Mutex
	m      map[replayKey]time.Time // expiry
	adds   int
}

func newReplayCache(window time.Duration) *replayCache {
	return &replayCache{window: window, m: make(map[replayKey]time.Time)}
}

func (r *replayCache) seen(k replayKey, now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	exp, ok := r.m[k]
	return ok && now.Before(exp)
}

func (r *replayCache) add(k replayKey, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.m[k] = now.Add(r.window)
	r.adds++
	if r.adds >= 1024 && r.adds >= len(r.m)/2 { // amortised sweep of expired pairs
		r.adds = 0
		for k, exp := range r.m {
			if !now.Before(exp) {
				delete(r.m, k)
			}
		}
	}
}

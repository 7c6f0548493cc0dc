package hook

import (
	"sort"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// floodEvents are the security events an attacker can trigger in bulk (a
// CONNECT flood, garbage on a control topic, tampered envelopes, logins
// reset before their CONNACK). Each name is capped at Options.EventRate
// events per second; the rest are counted and summed up in one
// events_suppressed event per name and second. Metrics still count every
// one.
var floodEvents = []string{
	"login_refused", "binding_mismatch", "control_refused", "envelope_refused", "session_abandoned",
}

// eventLimiter caps events per name with a token bucket: a burst of up to
// perSecond events passes at once (so the first event of a kind is never
// dropped, nor the first after a quiet second), then perSecond per second.
// Its map is built once and only read afterwards: allow takes no lock of
// its own.
type eventLimiter struct {
	kinds map[string]*limitedKind
}

type limitedKind struct {
	lim        *rate.Limiter
	suppressed atomic.Int64 // since the last drain
}

func newEventLimiter(perSecond int, names ...string) *eventLimiter {
	l := &eventLimiter{kinds: make(map[string]*limitedKind, len(names))}
	for _, n := range names {
		l.kinds[n] = &limitedKind{lim: rate.NewLimiter(rate.Limit(perSecond), perSecond)}
	}
	return l
}

// allow reports whether an event of name may be logged at now, and counts
// it as suppressed if not. Names not capped always pass.
func (l *eventLimiter) allow(name string, now time.Time) bool {
	k := l.kinds[name]
	if k == nil || k.lim.AllowN(now, 1) {
		return true
	}
	k.suppressed.Add(1)
	return false
}

// suppressedCount is how many events of one name were not logged.
type suppressedCount struct {
	name string
	n    int64
}

// drain returns the names with events suppressed since the last drain and
// how many, sorted by name, and resets their counts.
func (l *eventLimiter) drain() []suppressedCount {
	var out []suppressedCount
	for name, k := range l.kinds {
		if n := k.suppressed.Swap(0); n > 0 {
			out = append(out, suppressedCount{name, n})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

package hook

import (
	"context"
	"hash/maphash"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/codec"
)

// ReplayGuard remembers the (sn, nonce) pairs of accepted logins and
// control messages (SPEC section 3, step 6, and section 7), so that each
// is accepted once. *replay.Guard implements it, in memory
// (replay.NewMemory, the default) or also on disk, across restarts
// (replay.Open).
type ReplayGuard interface {
	// Claim claims the pair until the given time, atomically: true for
	// the first claim (accept the message), false if the pair is claimed
	// already (a replay). An error means that the guard cannot tell: the
	// message is refused.
	Claim(ctx context.Context, sn string, nonce uint64, until time.Time) (bool, error)
}

// claimMargin is added to the time a message can pass the skew check, for
// a guard whose clock is not the hook's (a shared store).
const claimMargin = time.Minute

// claim claims the nonce of a message stamped ts, after its digest has
// verified and before anything acts on it. The claim lasts as long as the
// message could pass the skew check: until max(ts, now) + Skew, and a
// margin. It has a deadline of its own, Options.ClaimTimeout, apart from
// the store calls around it: a fleet's claim may wait out a leader
// election.
func (h *Hook) claim(sn string, ts uint32, nonce codec.ID, now time.Time) (bool, error) {
	return h.claimWithin(new(deadlineCtx), sn, ts, nonce, now)
}

// claimWithin is claim with the zero deadline ctx to start, a login's
// (loginDeadlines).
func (h *Hook) claimWithin(ctx *deadlineCtx, sn string, ts uint32, nonce codec.ID, now time.Time) (bool, error) {
	from := time.Unix(int64(ts), 0)
	if now.After(from) {
		from = now
	}
	ctx.start(h.crew.ctx, h.opts.ClaimTimeout)
	defer ctx.release()
	return h.replay.Claim(ctx, sn, uint64(nonce), from.Add(h.opts.Skew+claimMargin))
}

// ThrottleOptions configure the back-off of repeated login failures for one
// identity (terminal sn or application name) from one source address.
// Failures from one address never slow the same identity from another.
// Zero fields take the values of DefaultThrottleOptions.
type ThrottleOptions struct {
	Free       int           // failures answered at once before refusals start
	Delay      time.Duration // extra wait before answering each failure up to Free; 0 = none
	Base       time.Duration // first refusal period; doubles with every further failure
	Max        time.Duration // longest refusal period
	MaxEntries int           // (identity, address) pairs remembered; at least 2
}

// DefaultThrottleOptions returns the value the hook gives each zero field
// of ThrottleOptions (Delay: none).
func DefaultThrottleOptions() ThrottleOptions {
	return ThrottleOptions{Free: 5, Base: time.Second, Max: 15 * time.Minute, MaxEntries: 100000}
}

func (o ThrottleOptions) withDefaults() ThrottleOptions {
	def := DefaultThrottleOptions()
	orDefault(&o.Free, def.Free)
	orDefault(&o.Base, def.Base)
	orDefault(&o.Max, def.Max)
	orDefault(&o.MaxEntries, def.MaxEntries)
	o.MaxEntries = max(o.MaxEntries, 2) // one probation and one blocked pair
	return o
}

// Throttler counts failed logins per (identity, source address) and says
// when a pair is in a refusal period (SPEC section 3, step 8). The default
// is the hook's bounded table, configured by Options.Throttle; a fleet of
// brokers may share counters through another implementation. It is called
// on every CONNECT, also under a flood of them, so it answers from memory
// (a shared implementation exchanges counters in the background).
type Throttler interface {
	// Blocked reports whether the pair is in a refusal period at now.
	Blocked(id, addr string, now time.Time) bool
	// Fail records a failed login of the pair and returns how long to wait
	// before answering it.
	Fail(id, addr string, now time.Time) time.Duration
	// Succeed forgets the pair's failures.
	Succeed(id, addr string)
}

type throttleKey struct{ id, addr string }

type throttleEntry struct {
	failures int
	until    time.Time // refused until then
	last     time.Time // last failure
}

// throttleTable is the default Throttler: a fixed number of shards, each
// with its own lock and two LRU lists of fixed size, so that every
// operation is O(1) and the table never holds more than MaxEntries pairs.
//
// A pair starts in its shard's probation list and moves to the blocked
// list at the failure that starts its first refusal period. The lists are
// apart so that a flood of fresh pairs with one failure each only evicts
// other probation pairs, never a pair being refused. Evicting a blocked
// pair takes Free failures of a fresh pair for every blocked slot of the
// shard (the residual limit, see SECURITY.md).
type throttleTable struct {
	opts   ThrottleOptions
	seed   maphash.Seed
	shards []throttleShard
}

type throttleShard struct {
	mu        sync.Mutex
	probation *simplelru.LRU[throttleKey, throttleEntry] // fewer than Free failures
	blocked   *simplelru.LRU[throttleKey, throttleEntry] // Free or more: refused, or refused before
	_         [40]byte                                   // keeps neighbouring locks off one cache line
}

// throttleShards is the number of shards of a table large enough; a small
// table has fewer, each with at least 64 pairs.
const throttleShards = 16

// NewThrottleTable returns the hook's default Throttler, the bounded table
// configured by o (zero fields take their defaults), for a caller that
// wraps it, such as a fleet that shares failures between brokers.
func NewThrottleTable(o ThrottleOptions) Throttler { return newThrottleTable(o.withDefaults()) }

func newThrottleTable(o ThrottleOptions) *throttleTable {
	n := min(throttleShards, max(o.MaxEntries/64, 1))
	per := o.MaxEntries / n
	t := &throttleTable{opts: o, seed: maphash.MakeSeed(), shards: make([]throttleShard, n)}
	for i := range t.shards {
		blocked := max(per/2, 1)
		t.shards[i].probation = mustLRU(max(per-blocked, 1))
		t.shards[i].blocked = mustLRU(blocked)
	}
	return t
}

func mustLRU(size int) *simplelru.LRU[throttleKey, throttleEntry] {
	l, err := simplelru.NewLRU[throttleKey, throttleEntry](size, nil)
	if err != nil {
		panic(err) // size is positive
	}
	return l
}

func (t *throttleTable) shard(k throttleKey) *throttleShard {
	var h maphash.Hash
	h.SetSeed(t.seed)
	h.WriteString(k.id)
	h.WriteByte(0)
	h.WriteString(k.addr)
	return &t.shards[h.Sum64()%uint64(len(t.shards))]
}

// Blocked reports whether the pair is in a refusal period.
func (t *throttleTable) Blocked(id, addr string, now time.Time) bool {
	k := throttleKey{id, addr}
	s := t.shard(k)
	s.mu.Lock()
	e, ok := s.blocked.Peek(k)
	s.mu.Unlock()
	return ok && now.Before(e.until)
}

// Fail records a failure and returns how long to wait before answering.
func (t *throttleTable) Fail(id, addr string, now time.Time) time.Duration {
	k := throttleKey{id, addr}
	s := t.shard(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropIdle(now, t.opts.Max)
	e, blocked := s.blocked.Peek(k)
	if !blocked {
		e, _ = s.probation.Peek(k)
	}
	e.failures++
	e.last = now
	over := e.failures - t.opts.Free
	if over < 0 {
		s.probation.Add(k, e) // the most recent: evicted last
		return t.opts.Delay * time.Duration(e.failures)
	}
	period := t.opts.Base << min(over, 30)
	if period > t.opts.Max || period <= 0 {
		period = t.opts.Max
	}
	e.until = now.Add(period)
	if !blocked {
		s.probation.Remove(k)
	}
	s.blocked.Add(k, e)
	return 0
}

// Succeed forgets the pair's failures.
func (t *throttleTable) Succeed(id, addr string) {
	k := throttleKey{id, addr}
	s := t.shard(k)
	s.mu.Lock()
	if !s.probation.Remove(k) {
		s.blocked.Remove(k)
	}
	s.mu.Unlock()
}

// Len returns the number of pairs remembered.
func (t *throttleTable) Len() int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n += s.probation.Len() + s.blocked.Len()
		s.mu.Unlock()
	}
	return n
}

// dropIdle forgets, from the old end of each list, at most two pairs that
// are not refused and had no failure for idle, so that the table empties
// after a flood without a sweep. Called with mu held.
func (s *throttleShard) dropIdle(now time.Time, idle time.Duration) {
	for _, l := range []*simplelru.LRU[throttleKey, throttleEntry]{s.probation, s.blocked} {
		for range 2 {
			_, e, ok := l.GetOldest()
			if !ok || now.Before(e.until) || now.Sub(e.last) <= idle {
				break
			}
			l.RemoveOldest()
		}
	}
}

// lener is implemented by a Throttler or ReplayGuard that can say how many
// entries it holds in this process; the hook exports that as a gauge.
type lener interface{ Len() int }

// registerGuardGauges exports the sizes of the throttle table and of the
// replay guard, when they can tell.
func registerGuardGauges(r prometheus.Registerer, th Throttler, rg ReplayGuard) error {
	gauges := []struct {
		name, help string
		of         any
	}{
		{"m2mguard_throttle_entries", "(identity, address) pairs the login throttle remembers; at most its MaxEntries.", th},
		{"m2mguard_replay_claims", "(sn, nonce) pairs of accepted logins and control messages held by the replay guard.", rg},
	}
	for _, g := range gauges {
		l, ok := g.of.(lener)
		if !ok {
			continue
		}
		if err := r.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: g.name, Help: g.help},
			func() float64 { return float64(l.Len()) })); err != nil {
			return err
		}
	}
	return nil
}

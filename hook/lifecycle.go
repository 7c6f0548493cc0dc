package hook

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
)

// A session's life. OnConnect creates it pending; OnSessionEstablished
// (mochi calls it once the CONNACK is out) makes it established: only then
// does it count in the sessions gauge and appear in Sessions, and only then
// will mochi call OnDisconnect for it. A login whose CONNACK cannot be
// written (the client reset the connection) gets neither call: the
// housekeeping sweep finds its client closed while still pending and
// forgets it (abandon).
const (
	statePending uint32 = iota
	stateEstablished
	stateEnded
)

// housekeepingEvery is the period of the housekeeping loop: abandoned
// logins, suppressed-event summaries; change expiry runs every minute.
const housekeepingEvery = time.Second

// crew owns the hook's goroutines: each one is started by spawn and
// waited for by stop, and ctx, which their waits select on, is cancelled
// by stop. The hook's writers (writes.go) and change desk (changes.go)
// start theirs through it too.
//
// A goroutine of the crew that has finished its function waits idleFor
// for another before it ends: a login storm's key writes (one short job
// per login) then run on a few goroutines whose stacks have already grown,
// instead of a new goroutine per login. spawn never waits for one: with
// none idle, it starts another.
type crew struct {
	ctx     context.Context
	cancel  context.CancelFunc
	idleFor time.Duration
	work    chan func() // unbuffered: only an idle goroutine takes from it

	mu      sync.Mutex
	stopped bool
	wg      sync.WaitGroup

	started atomic.Int64 // goroutines started (tests: reuse)
	idle    atomic.Int32 // goroutines waiting for work
	live    atomic.Int32 // goroutines running or waiting
}

// crewIdleFor is how long a crew goroutine waits for more work.
const crewIdleFor = time.Second

func newCrew() *crew {
	c := &crew{idleFor: crewIdleFor, work: make(chan func())}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c
}

// spawn runs f on a goroutine that stop waits for: an idle one of the
// crew if there is one, else a new one. It reports false (f not run) once
// the crew has stopped.
func (c *crew) spawn(f func()) bool {
	if c.ctx.Err() == nil {
		select {
		case c.work <- f:
			return true
		default:
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return false
	}
	c.wg.Add(1)
	c.started.Add(1)
	c.live.Add(1)
	go c.run(f)
	return true
}

// run runs f, then whatever spawn hands it, until it has been idle for
// idleFor or the crew stops.
func (c *crew) run(f func()) {
	defer c.wg.Done()
	defer c.live.Add(-1)
	var idle *time.Timer
	for {
		f()
		if idle == nil {
			idle = time.NewTimer(c.idleFor)
			defer idle.Stop()
		} else {
			idle.Reset(c.idleFor)
		}
		c.idle.Add(1)
		select {
		case f = <-c.work:
			c.idle.Add(-1)
		case <-idle.C:
			c.idle.Add(-1)
			return
		case <-c.ctx.Done():
			c.idle.Add(-1)
			return
		}
	}
}

// stop cancels ctx, refuses new goroutines and waits for the running ones.
func (c *crew) stop() {
	c.mu.Lock()
	if !c.stopped {
		c.stopped = true
		c.cancel()
	}
	c.mu.Unlock()
	c.wg.Wait()
}

// Init starts the housekeeping loop (mochi calls it when the hook is added).
func (h *Hook) Init(config any) error {
	h.crew.spawn(h.housekeeping)
	return nil
}

// Stop ends the housekeeping loop and pending SMS retries, and waits for
// every goroutine of the hook: key writers and disconnects end once their
// connection closes, which they bound themselves (WriteTimeout,
// DisconnectTimeout). mochi calls Stop when the server closes.
func (h *Hook) Stop() error {
	h.crew.stop()
	return nil
}

func (h *Hook) housekeeping() {
	tick := time.NewTicker(housekeepingEvery)
	defer tick.Stop()
	lastExpiry := time.Now()
	for {
		select {
		case <-h.crew.ctx.Done():
			h.reportSuppressed()
			return
		case now := <-tick.C:
			h.sweepAbandoned()
			h.reportSuppressed()
			if now.Sub(lastExpiry) >= time.Minute {
				lastExpiry = now
				h.changes.sweep()
			}
		}
	}
}

// reportSuppressed logs, per capped event name, how many events were not
// logged since the last report.
func (h *Hook) reportSuppressed() {
	for _, c := range h.events.drain() {
		h.event(slog.LevelWarn, "events_suppressed", "suppressed_event", c.name, "count", c.n)
	}
}

// pendingLogins are the sessions between OnConnect and
// OnSessionEstablished: a handful at any time, even in a connect storm. A
// plain map under a mutex: adding costs no allocation, unlike a sync.Map.
type pendingLogins struct {
	mu sync.Mutex
	m  map[*mqtt.Client]*session
}

func (p *pendingLogins) add(cl *mqtt.Client, s *session) {
	p.mu.Lock()
	p.m[cl] = s
	p.mu.Unlock()
}

func (p *pendingLogins) remove(cl *mqtt.Client) {
	p.mu.Lock()
	delete(p.m, cl)
	p.mu.Unlock()
}

// closed removes and returns the pending logins whose client has closed.
func (p *pendingLogins) closed() map[*mqtt.Client]*session {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out map[*mqtt.Client]*session
	for cl, s := range p.m {
		if cl.Closed() {
			if out == nil {
				out = map[*mqtt.Client]*session{}
			}
			out[cl] = s
			delete(p.m, cl)
		}
	}
	return out
}

// sweepAbandoned forgets the pending sessions whose client has closed: a
// login whose CONNACK could not be written, which mochi never reports. (A
// client closed between its CONNACK and OnSessionEstablished is forgotten
// here too; OnSessionEstablished and OnDisconnect then find nothing to do.)
func (h *Hook) sweepAbandoned() {
	for cl, s := range h.pending.closed() {
		if s.state.CompareAndSwap(statePending, stateEnded) {
			h.abandon(cl, s)
		}
	}
}

// abandon does for a login that never got its CONNACK what OnDisconnect
// and mochi do for an ended session: the hook forgets the connection; a
// clean session leaves mochi's client list (mochi would keep it for
// mqtt's session expiry, forever by default), a persistent one becomes an
// offline session.
func (h *Hook) abandon(cl *mqtt.Client, s *session) {
	h.sessions.CompareAndDelete(cl, s)
	if s.kind == kindTerminal {
		h.event(slog.LevelInfo, "session_abandoned", "sn", s.sn, "remote", remoteHost(cl.Net.Remote))
	} else {
		h.event(slog.LevelInfo, "session_abandoned", "app", s.app.Name, "remote", remoteHost(cl.Net.Remote))
	}
	if cl.IsTakenOver() {
		return // a newer connection has the ClientID and the session state
	}
	if expires(cl) {
		if cur, ok := h.server.Clients.Get(cl.ID); ok && cur == cl {
			cl.ClearInflights()
			h.server.UnsubscribeClient(cl)
			h.server.Clients.Delete(cl.ID)
		}
		return
	}
	h.offline.Store(cl.ID, s.identityOnly())
}

// expires reports whether cl's MQTT session ends with its connection, as
// mochi decides it when a client disconnects.
func expires(cl *mqtt.Client) bool {
	p := cl.Properties
	return (p.ProtocolVersion == 5 && p.Props.SessionExpiryInterval == 0) || (p.ProtocolVersion < 5 && p.Clean)
}

package fleet

import (
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/m2mguard/m2mguard/hook"
)

// Throttler returns a hook.Throttler that answers from local (the hook's
// table: hook.NewThrottleTable) and shares every failure and success with
// the fleet: each broker applies the others' to its own table, so a pair's
// failures count fleet-wide and an attacker who spreads guesses over N
// brokers gets no more than on one.
//
// Sharing is eventual: failures go out in batches, on core NATS, within
// milliseconds (at most throttleFlush later), and never block the login
// path (the queue is bounded; what does not fit is dropped and counted).
// While NATS is unreachable the throttle is local: no worse than a single
// broker. The messages carry the identity (sn or application name) and
// the source address, nothing secret.
func (f *Fleet) Throttler(local hook.Throttler) hook.Throttler {
	f.thr.register(local)
	return &sharedThrottle{local: local, pub: f.thr}
}

type sharedThrottle struct {
	local hook.Throttler
	pub   *throttlePub
}

func (t *sharedThrottle) Blocked(id, addr string, now time.Time) bool {
	return t.local.Blocked(id, addr, now)
}

func (t *sharedThrottle) Fail(id, addr string, now time.Time) time.Duration {
	d := t.local.Fail(id, addr, now)
	t.pub.enqueue(throttleOp{ID: id, Addr: addr, Fail: true})
	return d
}

func (t *sharedThrottle) Succeed(id, addr string) {
	t.local.Succeed(id, addr)
	t.pub.enqueue(throttleOp{ID: id, Addr: addr})
}

// Len is the local table's size, for the hook's gauge.
func (t *sharedThrottle) Len() int {
	if l, ok := t.local.(interface{ Len() int }); ok {
		return l.Len()
	}
	return 0
}

// throttleOp is one failure (Fail) or success of a pair.
type throttleOp struct {
	ID   string `json:"id"`
	Addr string `json:"addr"`
	Fail bool   `json:"fail,omitempty"`
}

// throttleBatch is the message on the throttle subject.
type throttleBatch struct {
	Origin string       `json:"origin"`
	Ops    []throttleOp `json:"ops"`
}

const (
	throttleQueue    = 4096                  // ops waiting to be sent
	throttleBatchMax = 256                   // ops per message
	throttleFlush    = 10 * time.Millisecond // longest wait before a batch goes out
	throttleMaxMsg   = 64 << 10              // a batch larger than this is refused
	maxIDLen         = 256                   // identity or address longer than this is not shared
)

// throttlePub sends the local ops and applies the others' to every local
// table that a Throttler wraps.
type throttlePub struct {
	f      *Fleet
	q      chan throttleOp
	sub    *nats.Subscription
	done   chan struct{}
	queued atomic.Int64 // ops accepted into q, for tests that wait for the fleet to agree

	mu     sync.Mutex
	tables []hook.Throttler // local tables the fleet's ops are applied to
}

func newThrottlePub(f *Fleet) *throttlePub {
	p := &throttlePub{f: f, q: make(chan throttleOp, throttleQueue), done: make(chan struct{})}
	sub, err := f.nc.Subscribe(throttleSubj, p.receive)
	if err == nil {
		err = f.nc.Flush()
	}
	if err != nil {
		f.log.Error("fleet: throttle subscribe", "error", err) // only on a closed connection
	}
	p.sub = sub
	f.goRun(p.run)
	return p
}

// enqueue queues an op without blocking.
func (p *throttlePub) enqueue(op throttleOp) {
	if len(op.ID) > maxIDLen || len(op.Addr) > maxIDLen {
		p.f.m.throttleDrop.Inc()
		return
	}
	select {
	case p.q <- op:
		p.queued.Add(1)
	default:
		p.f.m.throttleDrop.Inc()
	}
}

// register adds a local table that the fleet's ops are applied to.
func (p *throttlePub) register(t hook.Throttler) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, have := range p.tables {
		if have == t {
			return
		}
	}
	p.tables = append(p.tables, t)
}

// run batches the queue into messages until the fleet closes.
func (p *throttlePub) run() {
	batch := make([]throttleOp, 0, throttleBatchMax)
	flush := func() {
		if len(batch) == 0 {
			return
		}
		data, err := json.Marshal(throttleBatch{Origin: p.f.opts.BrokerID, Ops: batch})
		if err == nil {
			err = p.f.nc.Publish(throttleSubj, data)
		}
		if err != nil {
			p.f.m.throttleDrop.Add(float64(len(batch)))
		} else {
			p.f.m.throttleSent.Add(float64(len(batch)))
		}
		batch = batch[:0]
	}
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-p.done:
			for {
				select {
				case op := <-p.q:
					batch = append(batch, op)
					if len(batch) == throttleBatchMax {
						flush()
					}
				default:
					flush()
					return
				}
			}
		case op := <-p.q:
			if len(batch) == 0 {
				timer.Reset(throttleFlush)
			}
			batch = append(batch, op)
			if len(batch) == throttleBatchMax {
				timer.Stop()
				flush()
			}
		case <-timer.C:
			flush()
		}
	}
}

// stop sends what is queued and stops receiving.
func (p *throttlePub) stop() {
	if p.sub != nil {
		_ = p.sub.Unsubscribe()
	}
	close(p.done)
}

// receive applies another broker's batch to the local tables.
func (p *throttlePub) receive(m *nats.Msg) {
	b, err := decodeThrottleBatch(m.Data)
	if err != nil {
		p.f.log.Warn("fleet: throttle message refused", "error", err)
		return
	}
	if b.Origin == p.f.opts.BrokerID {
		return
	}
	p.mu.Lock()
	tables := append([]hook.Throttler(nil), p.tables...)
	p.mu.Unlock()
	now := time.Now()
	for _, t := range tables {
		for _, op := range b.Ops {
			if op.Fail {
				t.Fail(op.ID, op.Addr, now)
			} else {
				t.Succeed(op.ID, op.Addr)
			}
		}
	}
	p.f.m.throttleApply.Add(float64(len(b.Ops)))
}

var errThrottleMsg = errors.New("fleet: throttle message")

// decodeThrottleBatch parses and bounds a throttle message.
func decodeThrottleBatch(data []byte) (throttleBatch, error) {
	var b throttleBatch
	if len(data) > throttleMaxMsg {
		return b, fmt.Errorf("%w: %d bytes", errThrottleMsg, len(data))
	}
	if err := json.Unmarshal(data, &b); err != nil {
		return throttleBatch{}, fmt.Errorf("%w: %w", errThrottleMsg, err)
	}
	if b.Origin == "" || len(b.Ops) > throttleBatchMax {
		return throttleBatch{}, fmt.Errorf("%w: no origin or too many ops", errThrottleMsg)
	}
	for _, op := range b.Ops {
		if op.ID == "" || len(op.ID) > maxIDLen || len(op.Addr) > maxIDLen {
			return throttleBatch{}, fmt.Errorf("%w: bad op", errThrottleMsg)
		}
	}
	return b, nil
}

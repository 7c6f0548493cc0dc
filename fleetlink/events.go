package fleetlink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/keysvc"
)

// notifier tells the other brokers of writes and revocations, and applies
// theirs. Each goes two ways: a request to every live broker, answered
// once it has applied it (so that it holds fleet-wide when the write
// returns), and an event on the stream, which a broker that was cut off
// receives when it is back. A broker applies an event twice at most; both
// effects are idempotent, and a revocation it applied from the request is
// not applied again from the stream (a later login would be ended).
type notifier struct {
	l      *Link
	outbox *queue[fleet.Event] // events to publish in the background

	peersMu sync.Mutex
	peers   []string // the live brokers, this one included
	peersAt time.Time

	appliedMu sync.Mutex
	applied   map[string]time.Time // revocations applied from a request → when
}

// Methods other brokers call on this one (fleet request/reply).
const (
	methodInvalidate  = "invalidate"
	methodRevoke      = "revoke"
	methodSessions    = "sessions"
	methodDisconnect  = "disconnect"
	methodChangeStart = "change-start"
)

func newNotifier(l *Link) *notifier {
	return &notifier{l: l, outbox: newQueue[fleet.Event](), applied: map[string]time.Time{}}
}

// start subscribes to the event stream and runs the outbox (Attach).
func (n *notifier) start() error {
	stop, err := n.l.f.Bus().Subscribe(n.received)
	if err != nil {
		return err
	}
	n.l.addStop(stop)
	n.l.goRun(func() { n.outbox.run(n.l.ctx, n.publishQueued) })
	return nil
}

// written is keysvc.Options.OnWrite: the other brokers drop the record.
// A registration only replaces a "no such terminal" (cached for 2 s), so
// it goes out in the background; every other write is applied by every
// live broker before it returns.
func (n *notifier) written(w keysvc.Write) {
	e := fleet.Event{Kind: fleet.EventInvalidate, Origin: n.l.id, SN: w.SN, Reason: w.Op, Time: time.Now().UTC()}
	n.l.m.invalidations.WithLabelValues("sent").Inc()
	if w.Op == keysvc.OpRegister {
		n.outbox.push(e)
		return
	}
	n.broadcast(e, methodInvalidate)
}

// revoke ends terminal sn's sessions on every other live broker and
// stores the revocation on the stream; it returns how many sessions the
// others ended. operator names who asked for it, for their events.
func (n *notifier) revoke(sn, reason, operator string) int {
	e := fleet.Event{Kind: fleet.EventRevoke, Origin: n.l.id, SN: sn, Reason: reason, Operator: operator, Time: time.Now().UTC()}
	n.l.m.revocations.WithLabelValues("sent").Inc()
	ended := 0
	for _, r := range n.broadcast(e, methodRevoke) {
		var rep revokeReply
		if r.Err == nil && json.Unmarshal(r.Data, &rep) == nil {
			ended += rep.Ended
		}
	}
	return ended
}

// broadcast publishes e on the stream and sends it to every other live
// broker at once, and waits (NotifyTimeout at most) for both. A broker
// that does not answer gets it from the stream; one that is cut off, when
// it is back.
func (n *notifier) broadcast(e fleet.Event, method string) []fleet.Reply {
	ctx, cancel := context.WithTimeout(n.l.ctx, n.l.o.NotifyTimeout)
	defer cancel()
	data, _ := json.Marshal(e)
	published := make(chan struct{})
	go func() { // bounded by ctx; broadcast waits for it
		defer close(published)
		if err := n.l.f.Bus().Publish(ctx, e); err != nil {
			n.l.m.failures.WithLabelValues("publish").Inc()
			n.outbox.push(e) // published later, when NATS answers again
		}
	}()
	replies := n.tell(ctx, method, data)
	<-published
	for _, r := range replies {
		if r.Err != nil {
			n.l.m.failures.WithLabelValues("notify").Inc()
			n.l.log.Warn("fleet: a broker did not confirm; it applies the event from the stream", "broker", r.Broker,
				"event", e.Kind, "sn", e.SN, "error", r.Err)
		}
	}
	return replies
}

// tell sends req to every other live broker at once and returns their
// replies.
func (n *notifier) tell(ctx context.Context, method string, req []byte) []fleet.Reply {
	peers := n.livePeers(ctx)
	replies := make([]fleet.Reply, 0, len(peers))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, b := range peers {
		if b == n.l.id {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			data, err := n.l.f.Request(ctx, b, method, req)
			mu.Lock()
			replies = append(replies, fleet.Reply{Broker: b, Data: data, Err: err})
			mu.Unlock()
		}()
	}
	wg.Wait()
	return replies
}

// livePeers returns the live brokers, read from the fleet at most once a
// second (a write does not list the liveness bucket each time).
func (n *notifier) livePeers(ctx context.Context) []string {
	n.peersMu.Lock()
	defer n.peersMu.Unlock()
	if time.Since(n.peersAt) < time.Second {
		return n.peers
	}
	peers, err := n.l.f.Brokers(ctx)
	if err != nil {
		n.l.m.failures.WithLabelValues("gather").Inc()
		return n.peers // the last known: a broker that is gone fails at once
	}
	n.peers, n.peersAt = peers, time.Now()
	return peers
}

// publishQueued publishes an event of the outbox, retrying until it is
// stored, the event is too old for the stream to matter, or Close.
func (n *notifier) publishQueued(e fleet.Event) {
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		if time.Since(e.Time) > fleet.EventMaxAge {
			n.l.m.failures.WithLabelValues("publish").Inc()
			n.l.log.Warn("fleet: event dropped: not published within the stream's age; the other brokers dropped their caches at their resync",
				"event", e.Kind, "sn", e.SN)
			return
		}
		ctx, cancel := context.WithTimeout(n.l.ctx, 5*time.Second)
		err := n.l.f.Bus().Publish(ctx, e)
		cancel()
		if err == nil || n.l.ctx.Err() != nil {
			return
		}
		select {
		case <-n.l.ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// received applies an event of the stream, on the subscription's
// goroutine.
func (n *notifier) received(e fleet.Event) {
	switch {
	case e.Kind == fleet.EventResync:
		// More events were missed than the stream holds.
		n.l.svc.InvalidateAll()
		n.l.log.Warn("m2mguard fleet_caches_dropped", "event", "fleet_caches_dropped", "reason", e.Reason)
	case e.Origin == n.l.id:
		// Applied when it was written.
	case e.Kind == fleet.EventInvalidate:
		n.invalidate(e)
	case e.Kind == fleet.EventRevoke:
		n.applyRevoke(e, false)
	}
}

// invalidate drops the record of another broker's write.
func (n *notifier) invalidate(e fleet.Event) {
	if e.SN == "" {
		return
	}
	n.l.svc.Invalidate(e.SN)
	n.l.m.invalidations.WithLabelValues("applied").Inc()
}

// applyRevoke ends terminal e.SN's sessions here (another broker revoked
// it), once per revocation, and returns how many it ended. From the
// stream it runs in the background; from a request the caller waits.
func (n *notifier) applyRevoke(e fleet.Event, fromRequest bool) int {
	if e.SN == "" {
		return 0
	}
	n.l.svc.Invalidate(e.SN)
	key := e.Origin + " " + e.SN + " " + strconv.FormatInt(e.Time.UnixNano(), 10)
	n.appliedMu.Lock()
	_, done := n.applied[key]
	if !done {
		now := time.Now()
		for k, at := range n.applied {
			if now.Sub(at) > 2*fleet.EventMaxAge {
				delete(n.applied, k)
			}
		}
		n.applied[key] = now
	}
	n.appliedMu.Unlock()
	if done {
		return 0
	}
	n.l.m.revocations.WithLabelValues("applied").Inc()
	reason := e.Reason
	if reason == "" {
		reason = "revoked"
	}
	if fromRequest {
		return n.l.hook.RevokeBy(e.SN, reason, e.Operator)
	}
	n.l.goRun(func() { n.l.hook.RevokeBy(e.SN, reason, e.Operator) })
	return 0
}

// revokeReply is the answer to a revocation request.
type revokeReply struct {
	Ended int `json:"ended"`
}

// maxRequest bounds a request's body before it is decoded.
const maxRequest = 4096

var errRequest = errors.New("fleetlink: request")

// decodeEvent parses an invalidation or revocation request.
func decodeEvent(data []byte, kind string) (fleet.Event, error) {
	var e fleet.Event
	if len(data) > maxRequest {
		return e, fmt.Errorf("%w: %d bytes", errRequest, len(data))
	}
	if err := json.Unmarshal(data, &e); err != nil {
		return fleet.Event{}, fmt.Errorf("%w: %w", errRequest, err)
	}
	if e.Kind != kind || e.SN == "" || len(e.SN) > 64 || e.Origin == "" || len(e.Origin) > 64 {
		return fleet.Event{}, fmt.Errorf("%w: not a %s", errRequest, kind)
	}
	return e, nil
}

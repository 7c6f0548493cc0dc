package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Bus carries events between the brokers of a fleet on the JetStream
// stream M2MGUARD_EVENTS (subjects m2mguard.evt.<kind>), kept for
// EventMaxAge. A subscriber starts at the events published after it
// subscribed and, when its broker loses NATS for a moment, receives what it
// missed once it is back. If it missed more than the stream still holds,
// it gets an EventResync first: drop every cache.
type Bus struct {
	f *Fleet
}

// Event is a message between brokers. It names terminals, applications and
// ClientIDs, never a secret: no password, key, token or digest input.
type Event struct {
	Kind     string    `json:"kind"`                // one of the Event* kinds, or the integration's own
	Origin   string    `json:"origin"`              // the publishing broker; set by Publish
	Time     time.Time `json:"time"`                // when it was published; set by Publish if zero
	SN       string    `json:"sn,omitempty"`        // the terminal concerned
	App      string    `json:"app,omitempty"`       // the application concerned
	ClientID string    `json:"client_id,omitempty"` // the session concerned
	Reason   string    `json:"reason,omitempty"`    // why, for the log: "disabled", "deleted", "commit"
	Operator string    `json:"operator,omitempty"`  // the admin operator who asked for it (a name), for the log
	Seq      uint64    `json:"-"`                   // the stream sequence, set on delivery
}

// Event kinds the integration uses. A broker receives its own events too:
// it ignores those whose effect it applied already (Origin == BrokerID).
const (
	// EventRevoke ends the terminal's (SN) or the application's (App)
	// sessions on every broker: disable, delete, rekey.
	EventRevoke = "revoke"
	// EventInvalidate drops the key-service cache entries of the terminal
	// (SN) or application (App): a commit, an enable, an import.
	EventInvalidate = "invalidate"
	// EventResync is never published: Subscribe delivers it after a gap it
	// could not fill. Drop every cache; sessions stay.
	EventResync = "resync"
)

var kindRE = regexp.MustCompile(`^[a-z0-9-]{1,32}$`)

// maxEventSize bounds an event on the stream and before decoding.
const maxEventSize = 4096

// Bus returns the fleet's event bus.
func (f *Fleet) Bus() *Bus { return f.bus }

// Publish stores e on the stream: once it returns nil, every broker
// subscribed receives e, also one that is cut off now, when it is back
// (within EventMaxAge). Origin is set to this broker and Time to now if it
// is zero. It retries through a leader election until ctx ends (5 s if
// ctx has no deadline); an error means the event may not have been
// stored.
func (b *Bus) Publish(ctx context.Context, e Event) error {
	if !kindRE.MatchString(e.Kind) || e.Kind == EventResync {
		return fmt.Errorf("fleet: publish: event kind %q", e.Kind)
	}
	e.Origin = b.f.opts.BrokerID
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	data, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("fleet: publish: %w", err)
	}
	if len(data) > maxEventSize {
		return fmt.Errorf("fleet: publish: event of %d bytes", len(data))
	}
	var id [12]byte
	_, _ = rand.Read(id[:])
	msgID := hex.EncodeToString(id[:])
	// Retried through a leader election; the message id makes the stream
	// store a retried event once.
	err = retry(ctx, func(ctx context.Context) error {
		_, err := b.f.js.Publish(ctx, "m2mguard.evt."+e.Kind, data, jetstream.WithMsgID(msgID))
		return err
	})
	if err != nil {
		return fmt.Errorf("fleet: publish %s: %w", e.Kind, err)
	}
	b.f.m.events.WithLabelValues("published", e.Kind).Inc()
	return nil
}

// Subscribe calls fn with every event published from now on, in the
// stream's order, on one goroutine; fn must not block for long. stop ends
// the subscription and waits; Close does it too.
func (b *Bus) Subscribe(fn func(Event)) (stop func(), err error) {
	ctx, cancel := context.WithTimeout(b.f.ctx, 5*time.Second)
	defer cancel()
	cons, err := b.f.js.OrderedConsumer(ctx, EventStream, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return nil, fmt.Errorf("fleet: subscribe: %w", err)
	}
	var last uint64 // the last stream sequence delivered
	var mu sync.Mutex
	handler := func(m jetstream.Msg) {
		mu.Lock() // the consumer calls one at a time; the lock makes it plain
		defer mu.Unlock()
		meta, err := m.Metadata()
		if err != nil {
			return
		}
		seq := meta.Sequence.Stream
		if seq <= last {
			return // a redelivery after a reset
		}
		if last != 0 && seq > last+1 {
			b.f.log.Warn("m2mguard fleet_events_gap", "event", "fleet_events_gap", "missed", seq-last-1)
			fn(Event{Kind: EventResync, Origin: b.f.opts.BrokerID, Time: time.Now().UTC(), Reason: "events missed"})
		}
		last = seq
		e, err := decodeEvent(m.Data())
		if err != nil {
			b.f.log.Warn("fleet: event refused", "subject", m.Subject(), "error", err)
			return
		}
		e.Seq = seq
		b.f.m.events.WithLabelValues("received", e.Kind).Inc()
		fn(e)
	}
	cc, err := cons.Consume(handler, jetstream.PullExpiry(4*time.Second), jetstream.PullHeartbeat(time.Second),
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
			if !errors.Is(err, jetstream.ErrNoHeartbeat) {
				b.f.log.Debug("fleet: event consumer", "error", err)
			}
		}))
	if err != nil {
		return nil, fmt.Errorf("fleet: subscribe: %w", err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cc.Stop()
			<-cc.Closed()
		})
	}
	if !b.f.addCloser(stop) {
		stop()
		return nil, ErrClosed
	}
	return stop, nil
}

// ErrEvent is wrapped by the error of an event that does not decode.
var ErrEvent = errors.New("fleet: event")

// decodeEvent parses and bounds an event from the stream.
func decodeEvent(data []byte) (Event, error) {
	var e Event
	if len(data) > maxEventSize {
		return e, fmt.Errorf("%w: %d bytes", ErrEvent, len(data))
	}
	if err := json.Unmarshal(data, &e); err != nil {
		return Event{}, fmt.Errorf("%w: %w", ErrEvent, err)
	}
	if !kindRE.MatchString(e.Kind) || e.Kind == EventResync || !brokerIDRE.MatchString(e.Origin) {
		return Event{}, fmt.Errorf("%w: kind or origin", ErrEvent)
	}
	return e, nil
}

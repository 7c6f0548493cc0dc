package fleetroute

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/fleet"
)

// Names of the JetStream assets and subjects of the downlink routing.
const (
	DownlinkStream   = "M2MGUARD_DOWNLINKS" // downlinks waiting for their terminal
	DownlinkPrefix   = "m2mguard.down."     // its subjects: DownlinkPrefix + fleet.EscapeKey(sn)
	DownlinkKick     = "m2mguard.downkick"  // core NATS: "drain sn" (the payload), to every broker
	downHdrTopic     = "M2M-Topic"          // the MQTT topic name
	downHdrQoS       = "M2M-QoS"            // "0", "1" or "2"
	downHdrRetain    = "M2M-Retain"         // "1" if retained
	downFullMessage  = "maximum messages per subject exceeded"
	downAppendTries  = 4  // appends of one message while its terminal's queue is full
	downWindow       = 32 // unacknowledged downlinks a drain lets a session have
	downDrainsAtOnce = 16 // drains running at once on a broker
)

// Defaults of DownlinkOptions.
const (
	DefaultDownlinkQueue         = 1000
	DefaultDownlinkAppendTimeout = 3 * time.Second
	DefaultDownlinkStallTimeout  = 30 * time.Second
)

// DownlinkOptions configure Downlinks. Fleet, Server and Ready are
// required; a zero number or duration takes its default.
type DownlinkOptions struct {
	Fleet  *fleet.Fleet // the broker's open fleet: its connection and replicas
	Server *mqtt.Server // the broker's mochi server, with InlineClient on
	// Ready reports whether terminal sn has a session on this broker
	// that is ready to receive downlink data: hook.(*Hook).DownlinkReady.
	Ready func(sn string) bool
	// Queue bounds the downlinks waiting for one terminal; the oldest
	// are dropped for newer ones. 0 = DefaultDownlinkQueue.
	Queue int
	// MaxAge is how long a downlink waits for its terminal (the MQTT
	// session expiry); 0 = until delivered.
	MaxAge time.Duration
	// AppendTimeout bounds the wait for JetStream's acknowledgement of an
	// application's downlink, retries through a leader election included.
	// 0 = DefaultDownlinkAppendTimeout.
	AppendTimeout time.Duration
	// StallTimeout is how long a drain waits for a terminal to
	// acknowledge downlinks before it leaves the rest in the stream (for
	// the next kick or login). 0 = DefaultDownlinkStallTimeout.
	StallTimeout time.Duration
	Logger       *slog.Logger          // nil = slog.Default()
	Registerer   prometheus.Registerer // nil = none
}

// Downlinks routes downlink data through the fleet, so that an
// application connected to any broker reaches a terminal connected to any
// other, and a terminal that was offline receives what was published
// meanwhile wherever it logs in next. It is a mochi hook that a broker in
// fleet mode adds after the m2mguard hook (which has refused what the
// application may not publish: nothing it refuses reaches the stream) and
// before the session store (which then never journals a downlink that
// this broker does not deliver itself). Create it with NewDownlinks; the
// m2mguard hook's Options.OnDownlinkReady is its Wake and
// Options.OnDownlinksDiscarded its Requeue.
//
// # Publish side
//
// OnPublish takes a real client's publish on m2m/<sn>/down/... (never one
// of mochi's inline client), appends it to the stream M2MGUARD_DOWNLINKS,
// subject m2mguard.down.<fleet.EscapeKey(sn)>, the plaintext payload with
// the topic, QoS and retain flag in headers, waits for JetStream's
// acknowledgement (AppendTimeout), tells every broker to drain sn (a core
// NATS message on m2mguard.downkick) and returns
// packets.CodeSuccessIgnore: mochi acknowledges the publish to the
// application and delivers nothing locally. Every downlink goes through
// the stream, the terminal's own broker's too: nothing is delivered twice
// by two paths, and the stream's order is the order of delivery.
//
// If JetStream does not acknowledge in time, the publish is refused so
// that the application sends it again: at QoS 1 and 2 no PUBACK and the
// application's connection is ended (MQTT 5: DISCONNECT 0x89 server
// busy; 3.1.1 just closes), and a client with a persistent session
// resends the unacknowledged PUBLISH when it reconnects, as MQTT
// requires (a clean one must publish again). mochi offers nothing better:
// CodeSuccessIgnore would acknowledge a lost message, ErrRejectPacket
// alone leaves a QoS 1 sender waiting for a PUBACK that never comes, any
// other code publishes the packet locally under 3.1.1 (and panics under
// MQTT 5 if wrapped). At QoS 0 the message is dropped (at most once). A
// payload larger than NATS's max_payload (1 MiB by default) can never be
// stored: it is acknowledged and dropped, and counted.
//
// # Holder side
//
// The broker holding the terminal's session drains its subject: when it
// is kicked for the terminal and its session is ready (DownlinkOptions.
// Ready: subscribed to its downlinks, its sk written), and when the
// session becomes ready (Wake, from the hook). A drain reads the
// subject's messages in order (Stream.GetMsg, next by subject: no
// consumer), injects each into mochi with server.Publish (inline client),
// which delivers it to the terminal sealed under this session's key (the
// hook's OnPacketEncode) and, at QoS 1 and 2, keeps it in the MQTT session
// until acknowledged (and in the session store), and only then deletes it
// from the stream. Drains are serialized per terminal on a broker: a kick
// during a drain makes it read once more. It lets the session have at
// most 32 unacknowledged downlinks at a time (mochi drops what does not
// fit a client's send buffer until the next reconnect); a terminal that
// acknowledges nothing for StallTimeout keeps the rest in the stream.
//
// Nothing is stranded by a login racing an append: the publish side
// appends, then kicks; the login side makes the session ready (the
// hook's state), then drains. If the kick is handled before the session
// is ready, the drain that follows readiness starts after the kick, so
// after the append, and reads the message; if after, the kick's drain
// does (a drain in progress reads again).
//
// # Guarantees
//
// At least once, in order per terminal: a downlink acknowledged to the
// application is replicated in JetStream (the fleet's replicas) until a
// broker has put it into the terminal's MQTT session; a broker that fails
// between injecting and deleting delivers it again. Per terminal at most
// Queue messages wait: an append to a full queue deletes the oldest
// (m2mguard_fleet_route_downlinks_dropped_total) and keeps the newest. The
// count is exact on a single NATS server; in a JetStream cluster an append
// right behind the previous one may pass JetStream's check of the full
// subject before that one is applied, and JetStream then drops the oldest
// itself, uncounted (seen: once in twelve appends to a full queue, under
// load): the metric is a lower bound there, the bound itself holds. A
// message waits at most MaxAge (mqtt.session_expiry). A terminal that
// subscribes to its downlinks at QoS 0 receives them at QoS 0: at most
// once from its broker's session on.
//
// A terminal that moves to another broker receives there what waits in
// the stream. What its old broker had already put into the old MQTT
// session and not seen acknowledged (or withheld from it) goes back into
// the stream when the takeover discards that session (Requeue, from the
// hook's Options.OnDownlinksDiscarded): behind what waits already, so
// out of order, and perhaps a second time. Only a broker that dies with
// such messages in its session loses them with it.
// Retained downlinks are retained by the broker that delivers them.
//
// # Security
//
// Downlinks rest in JetStream in plaintext (they are sealed only at
// delivery, under the receiving session's key): NATS's TLS and
// authentication protect them on the wire, and only JetStream's own
// encryption at rest protects the files (see SECURITY.md).
type Downlinks struct {
	mqtt.HookBase
	opts   DownlinkOptions
	log    *slog.Logger
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream
	m      *downMetrics
	maxIn  int // mochi's maximum messages in flight per client

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	sem    chan struct{}
	sub    *nats.Subscription

	mu     sync.Mutex
	drains map[string]*drainState // sn → its running drain
	closed bool
}

// drainState is one terminal's running drain on this broker.
type drainState struct {
	again bool          // Wake while it ran: read once more
	acked chan struct{} // a downlink acknowledged (OnQosComplete)
}

// NewDownlinks creates (or updates) the stream and returns the hook, to be
// added to the server with AddHook; Start then subscribes to the kicks. It
// retries through a leader election until ctx ends.
func NewDownlinks(ctx context.Context, o DownlinkOptions) (*Downlinks, error) {
	if o.Fleet == nil || o.Server == nil || o.Ready == nil {
		return nil, errors.New("fleetroute: DownlinkOptions.Fleet, Server and Ready are required")
	}
	if o.Queue <= 0 {
		o.Queue = DefaultDownlinkQueue
	}
	if o.AppendTimeout <= 0 {
		o.AppendTimeout = DefaultDownlinkAppendTimeout
	}
	if o.StallTimeout <= 0 {
		o.StallTimeout = DefaultDownlinkStallTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	m, err := newDownMetrics(o.Registerer)
	if err != nil {
		return nil, err
	}
	d := &Downlinks{opts: o, log: o.Logger, nc: o.Fleet.Conn(), m: m, sem: make(chan struct{}, downDrainsAtOnce),
		drains: map[string]*drainState{}, maxIn: int(o.Server.Options.Capabilities.MaximumInflight)}
	if d.js, err = jetstream.New(d.nc); err != nil {
		return nil, fmt.Errorf("fleetroute: jetstream: %w", err)
	}
	cfg := jetstream.StreamConfig{
		Name: DownlinkStream, Description: "m2mguard downlinks waiting for their terminal",
		Subjects: []string{DownlinkPrefix + "*"}, Retention: jetstream.LimitsPolicy, Storage: jetstream.FileStorage,
		Replicas: o.Fleet.Replicas(), MaxAge: o.MaxAge, MaxMsgsPerSubject: int64(o.Queue),
		// Full queues refuse the append, which then deletes the oldest
		// itself: each drop is counted (DiscardOld would drop silently),
		// but for JetStream's own in a cluster's race (see Downlinks).
		Discard: jetstream.DiscardNew, DiscardNewPerSubject: true,
	}
	err = createRetry(ctx, time.Second, func(ctx context.Context) (err error) {
		d.stream, err = d.js.CreateOrUpdateStream(ctx, cfg)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("fleetroute: stream %s: %w", DownlinkStream, err)
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d, nil
}

// Start subscribes to the kicks of the fleet: call it once the server
// serves and Ready can answer.
func (d *Downlinks) Start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || d.sub != nil {
		return nil
	}
	sub, err := d.nc.Subscribe(DownlinkKick, func(msg *nats.Msg) {
		if len(msg.Data) > 0 && len(msg.Data) <= fleet.MaxKeyInput {
			d.Wake(string(msg.Data))
		}
	})
	if err != nil {
		return fmt.Errorf("fleetroute: subscribe %s: %w", DownlinkKick, err)
	}
	d.sub = sub
	return nil
}

// ID names the hook to mochi.
func (d *Downlinks) ID() string { return "m2mguard-fleet-downlinks" }

// Provides lists the events the hook handles.
func (d *Downlinks) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnQosComplete
}

// Stop is Close (mochi calls it when the server closes).
func (d *Downlinks) Stop() error { return d.Close() }

// Close stops the kicks and the drains and waits for them; a drain ends
// after the request it is in. Messages not drained stay in the stream.
// OnPublish keeps appending while the fleet is open.
func (d *Downlinks) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	sub := d.sub
	d.mu.Unlock()
	var err error
	if sub != nil {
		err = sub.Unsubscribe()
	}
	d.cancel()
	d.wg.Wait()
	if err != nil && !errors.Is(err, nats.ErrConnectionClosed) && !errors.Is(err, nats.ErrBadSubscription) {
		return fmt.Errorf("fleetroute: downlinks: %w", err)
	}
	return nil
}

// OnPublish routes an application's downlink through the stream (see
// Downlinks).
func (d *Downlinks) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	kind, sn := codec.ParseTopic(pk.TopicName)
	if kind != codec.TopicDown {
		return pk, nil
	}
	err := d.append(sn, pk)
	switch {
	case err == nil:
	case errors.Is(err, nats.ErrMaxPayload):
		d.m.failures.WithLabelValues("too_large").Inc()
		d.log.Warn("m2mguard downlink_dropped", "event", "downlink_dropped", "sn", sn, "client_id", cl.ID,
			"reason", "larger than NATS's max_payload", "bytes", len(pk.Payload))
		return pk, packets.CodeSuccessIgnore
	default:
		d.m.failures.WithLabelValues("append").Inc()
		d.log.Warn("m2mguard downlink_refused", "event", "downlink_refused", "sn", sn, "client_id", cl.ID,
			"qos", pk.FixedHeader.Qos, "error", err)
		if pk.FixedHeader.Qos > 0 {
			// From the read goroutine, as mochi ends a client whose
			// publish its ACL refuses: no later packet of it is read, so
			// nothing it sent after this one overtakes it.
			if cl.Properties.ProtocolVersion >= 5 {
				_ = d.opts.Server.DisconnectClient(cl, packets.ErrServerBusy)
			} else {
				cl.Stop(packets.ErrServerBusy) // 3.1.1 has no DISCONNECT from the server
			}
		}
		return pk, packets.ErrRejectPacket
	}
	if err := d.nc.Publish(DownlinkKick, []byte(sn)); err != nil {
		// Stored: the terminal's next login (or the next downlink's kick) drains it.
		d.m.failures.WithLabelValues("kick").Inc()
	}
	return pk, packets.CodeSuccessIgnore
}

// append stores pk in sn's subject and waits for JetStream; a full queue
// loses its oldest message for it.
func (d *Downlinks) append(sn string, pk packets.Packet) error {
	key, err := fleet.EscapeKey(sn)
	if err != nil {
		return err
	}
	subj := DownlinkPrefix + key
	msg := nats.NewMsg(subj)
	msg.Data = pk.Payload
	msg.Header.Set(downHdrTopic, pk.TopicName)
	msg.Header.Set(downHdrQoS, strconv.Itoa(int(pk.FixedHeader.Qos)))
	if pk.FixedHeader.Retain {
		msg.Header.Set(downHdrRetain, "1")
	}
	ctx, cancel := context.WithTimeout(context.Background(), d.opts.AppendTimeout)
	defer cancel()
	for try := 1; ; try++ {
		_, err = d.js.PublishMsg(ctx, msg, jetstream.WithExpectStream(DownlinkStream), jetstream.WithRetryAttempts(10))
		if err == nil {
			d.m.appended.Inc()
			return nil
		}
		if !queueFull(err) || try == downAppendTries {
			return err
		}
		if err := d.dropOldest(ctx, sn, subj); err != nil {
			return err
		}
	}
}

// queueFull reports JetStream's refusal of an append to a full subject.
func queueFull(err error) bool {
	var api *jetstream.APIError
	return errors.As(err, &api) && strings.Contains(api.Description, downFullMessage)
}

// dropOldest deletes the oldest message of subj; another broker may have
// deleted it first (delivered, or dropped for its own append).
func (d *Downlinks) dropOldest(ctx context.Context, sn, subj string) error {
	m, err := d.stream.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(subj))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	err = d.stream.DeleteMsg(ctx, m.Sequence)
	if err == nil {
		d.m.dropped.Inc()
		d.log.Warn("m2mguard downlink_dropped", "event", "downlink_dropped", "sn", sn, "reason", "queue full", "queue", d.opts.Queue)
		return nil
	}
	if errors.Is(err, jetstream.ErrMsgNotFound) || errors.Is(err, jetstream.ErrMsgDeleteUnsuccessful) {
		return nil
	}
	return err
}

// Wake drains sn's downlinks if its session here is ready: the hook's
// Options.OnDownlinkReady, and the kicks. It does not block.
func (d *Downlinks) Wake(sn string) {
	if !d.opts.Ready(sn) {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return
	}
	if st, ok := d.drains[sn]; ok {
		st.again = true
		return
	}
	st := &drainState{acked: make(chan struct{}, 1)}
	d.drains[sn] = st
	d.wg.Add(1)
	go d.drainLoop(sn, st)
}

// Requeue puts back into the stream the downlinks of a terminal's MQTT
// session that this broker discards because the terminal moved to another
// broker (the m2mguard hook's Options.OnDownlinksDiscarded), and kicks the
// fleet. It does not block: the appends run on a goroutine Close waits
// for. They go behind what waits already, so they may reach the terminal
// after newer downlinks, and perhaps a second time (the old broker had
// written them, unacknowledged).
func (d *Downlinks) Requeue(sn string, msgs []packets.Packet) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		d.m.failures.WithLabelValues("requeue").Add(float64(len(msgs)))
		return
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		for i, pk := range msgs {
			if err := d.append(sn, pk); err != nil {
				// JetStream did not take it in AppendTimeout: nor would
				// it take the rest (Close waits for this goroutine).
				d.m.failures.WithLabelValues("requeue").Add(float64(len(msgs) - i))
				d.log.Warn("m2mguard downlink_lost", "event", "downlink_lost", "sn", sn, "reason", "requeue failed",
					"messages", len(msgs)-i, "error", err)
				break
			}
			d.m.requeued.Inc()
		}
		if err := d.nc.Publish(DownlinkKick, []byte(sn)); err != nil {
			d.m.failures.WithLabelValues("kick").Inc()
		}
	}()
}

// OnQosComplete lets a drain waiting for acknowledgements go on.
func (d *Downlinks) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	d.mu.Lock()
	st := d.drains[cl.ID]
	d.mu.Unlock()
	if st != nil {
		select {
		case st.acked <- struct{}{}:
		default:
		}
	}
}

// drainLoop drains sn until no Wake came during the last pass.
func (d *Downlinks) drainLoop(sn string, st *drainState) {
	defer d.wg.Done()
	for {
		select {
		case d.sem <- struct{}{}:
			d.drain(sn, st)
			<-d.sem
		case <-d.ctx.Done():
		}
		d.mu.Lock()
		if st.again && d.ctx.Err() == nil {
			st.again = false
			d.mu.Unlock()
			continue
		}
		delete(d.drains, sn)
		d.mu.Unlock()
		return
	}
}

// drain delivers sn's waiting downlinks in order while its session here
// is ready.
func (d *Downlinks) drain(sn string, st *drainState) {
	key, err := fleet.EscapeKey(sn)
	if err != nil {
		return
	}
	subj := DownlinkPrefix + key
	for next := uint64(1); d.ctx.Err() == nil; {
		if !d.opts.Ready(sn) || !d.room(sn, st) {
			return
		}
		ctx, cancel := context.WithTimeout(d.ctx, d.opts.AppendTimeout)
		m, err := d.stream.GetMsg(ctx, next, jetstream.WithGetMsgSubject(subj))
		cancel()
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return
		}
		if err != nil {
			if d.ctx.Err() == nil {
				d.m.failures.WithLabelValues("read").Inc()
				d.log.Warn("m2mguard downlink_read_failed", "event", "downlink_read_failed", "sn", sn, "error", err)
			}
			return // the next kick or login reads again
		}
		next = m.Sequence + 1
		topic, qos, retain, ok := decodeDownlink(sn, m.Header)
		if !ok {
			d.m.failures.WithLabelValues("invalid").Inc()
			d.log.Warn("m2mguard downlink_invalid", "event", "downlink_invalid", "sn", sn, "seq", m.Sequence)
		} else if err := d.opts.Server.Publish(topic, m.Data, retain, qos); err != nil {
			d.m.failures.WithLabelValues("deliver").Inc()
			d.log.Warn("m2mguard downlink_delivery_failed", "event", "downlink_delivery_failed", "sn", sn, "error", err)
			return
		} else {
			d.m.delivered.Inc()
		}
		ctx, cancel = context.WithTimeout(d.ctx, d.opts.AppendTimeout)
		err = d.stream.DeleteMsg(ctx, m.Sequence)
		cancel()
		if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) && !errors.Is(err, jetstream.ErrMsgDeleteUnsuccessful) {
			// Delivered but still stored: a later drain delivers it again.
			d.m.failures.WithLabelValues("delete").Inc()
			d.log.Warn("m2mguard downlink_delete_failed", "event", "downlink_delete_failed", "sn", sn, "seq", m.Sequence, "error", err)
		}
	}
}

// room waits until sn's session has fewer than downWindow messages in
// flight (acknowledged ones leave it), at most StallTimeout; false if it
// did not, or the session is gone.
func (d *Downlinks) room(sn string, st *drainState) bool {
	stall := time.NewTimer(d.opts.StallTimeout)
	defer stall.Stop()
	for {
		cl, ok := d.opts.Server.Clients.Get(sn)
		if !ok || cl.Closed() {
			return false
		}
		if n := cl.State.Inflight.Len(); n < downWindow && n < d.maxIn {
			return true
		}
		select {
		case <-st.acked:
		case <-time.After(100 * time.Millisecond): // an acknowledgement of QoS 2 or a close is not signalled
		case <-stall.C:
			d.m.failures.WithLabelValues("stalled").Inc()
			d.log.Warn("m2mguard downlink_stalled", "event", "downlink_stalled", "sn", sn, "in_flight", cl.State.Inflight.Len())
			return false
		case <-d.ctx.Done():
			return false
		}
	}
}

// decodeDownlink reads a stored downlink's headers: its topic must be a
// downlink topic of sn, whose subject it was stored under.
func decodeDownlink(sn string, h nats.Header) (topic string, qos byte, retain bool, ok bool) {
	topic = h.Get(downHdrTopic)
	if kind, tsn := codec.ParseTopic(topic); kind != codec.TopicDown || tsn != sn {
		return "", 0, false, false
	}
	q, err := strconv.Atoi(h.Get(downHdrQoS))
	if err != nil || q < 0 || q > 2 {
		return "", 0, false, false
	}
	return topic, byte(q), h.Get(downHdrRetain) == "1", true
}

// downMetrics are the downlink routing's series.
type downMetrics struct {
	appended, delivered, dropped, requeued prometheus.Counter
	failures                               *prometheus.CounterVec
}

func newDownMetrics(reg prometheus.Registerer) (*downMetrics, error) {
	m := &downMetrics{
		appended: prometheus.NewCounter(prometheus.CounterOpts{Name: "m2mguard_fleet_route_downlinks_appended_total",
			Help: "Downlinks of this broker's applications stored in the fleet's stream."}),
		delivered: prometheus.NewCounter(prometheus.CounterOpts{Name: "m2mguard_fleet_route_downlinks_delivered_total",
			Help: "Downlinks from the fleet's stream delivered into a terminal's session on this broker."}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "m2mguard_fleet_route_downlinks_dropped_total",
			Help: "Oldest downlinks dropped from a terminal's full queue (cluster.downlink_queue) by this broker's appends."}),
		requeued: prometheus.NewCounter(prometheus.CounterOpts{Name: "m2mguard_fleet_route_downlinks_requeued_total",
			Help: "Downlinks of a moved terminal's discarded MQTT session put back into the fleet's stream."}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "m2mguard_fleet_route_downlinks_failures_total",
			Help: "Downlink routing failures by op: append (refused to the application), too_large, kick, read, deliver, delete, invalid, stalled, requeue (lost)."},
			[]string{"op"}),
	}
	for _, op := range []string{"append", "too_large", "kick", "read", "deliver", "delete", "invalid", "stalled", "requeue"} {
		m.failures.WithLabelValues(op)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.appended, m.delivered, m.dropped, m.requeued, m.failures} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("fleetroute: metrics: %w", err)
			}
		}
	}
	return m, nil
}

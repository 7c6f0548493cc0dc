package fleetroute

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/fleet"
)

// Names of the JetStream assets of the uplink routing.
const (
	UplinkStream   = "M2MGUARD_UPLINKS"  // every routed uplink, kept UplinkOptions.MaxAge
	UplinkPrefix   = "m2mguard.up."      // its subjects: UplinkPrefix + TopicSubject
	RetainedStream = "M2MGUARD_RETAINED" // the last retained uplink of every topic
	RetainedPrefix = "m2mguard.ret."     // its subjects
	uplinkConsumer = "uplinks-"          // + broker id: each broker's durable consumer
	upHdrOrigin    = "M2M-Origin"        // the broker whose client published it
	upHdrQoS       = "M2M-QoS"           // "0", "1" or "2"
	upHdrRetain    = "M2M-Retain"        // "1" if retained
	upHdrWill      = "M2M-Will"          // "1" for a will (for the log and metrics)
	// upAckWait is how long JetStream waits for a broker's acknowledgement
	// before it delivers a message again: injection takes microseconds, so
	// this is about messages (or acknowledgements) lost when the
	// consumer's leader moves.
	upAckWait = 10 * time.Second
)

// ErrTooLarge is wrapped by the error of an uplink larger than the NATS
// server accepts (its max_payload, 1 MiB by default, headers included).
var ErrTooLarge = errors.New("fleetroute: message too large for NATS")

// Defaults of UplinkOptions.
const (
	DefaultUplinkMaxAge      = time.Hour
	DefaultUplinkMaxBytes    = 128 << 20
	DefaultRetainedMaxBytes  = 16 << 20
	DefaultUplinkAckTimeout  = 3 * time.Second
	DefaultUplinkMaxPending  = 1024
	defaultRetainedLoadLimit = 30 * time.Second
)

// UplinkOptions configure Uplinks. Fleet and Server are required; a zero
// number or duration takes its default.
type UplinkOptions struct {
	Fleet  *fleet.Fleet  // the broker's open fleet: its connection, broker id and replicas
	Server *mqtt.Server  // the broker's mochi server, with InlineClient on
	MaxAge time.Duration // how long the uplink stream keeps a message; also the consumer's InactiveThreshold. 0 = 1 h
	// MaxBytes bounds the uplink stream (the oldest go first); 0 = 128
	// MiB. JetStream reserves it on each replica's node (an embedded
	// node stores 1 GiB).
	MaxBytes int64
	// RetainedMaxBytes bounds the retained stream; 0 = 16 MiB.
	RetainedMaxBytes int64
	// AckTimeout bounds the wait for JetStream's acknowledgement of a
	// QoS 1 or 2 uplink, retries through a leader election included; then
	// the publish is refused (the client is disconnected unacknowledged).
	// 0 = 3 s.
	AckTimeout time.Duration
	// MaxAckPending bounds the messages the broker's consumer has
	// delivered and not yet acknowledged; 0 = 1024.
	MaxAckPending int

	Logger     *slog.Logger          // nil = slog.Default()
	Registerer prometheus.Registerer // nil = no metrics exported
}

// Uplinks is the mochi hook that makes uplinks fleet-wide: add it after
// the m2mguard hook and the session-store hook, start it (Start) after the
// server's Serve, and Close it before the server closes. See the package
// documentation.
type Uplinks struct {
	mqtt.HookBase
	opts   UplinkOptions
	id     string
	log    *slog.Logger
	nc     *nats.Conn
	js     jetstream.JetStream
	cons   jetstream.Consumer
	m      *upMetrics
	msgTag string        // prefix of the message ids of this process
	msgSeq atomic.Uint64 // their counter

	mu      sync.Mutex
	cc      jetstream.ConsumeContext // nil until Start, and after Close
	started bool
	closed  bool
}

// NewUplinks creates (or updates) the uplink and retained streams and
// this broker's durable consumer; on first creation the consumer delivers
// only what is published from then on. It retries while JetStream elects
// a leader, until ctx ends. Nothing is consumed before Start.
func NewUplinks(ctx context.Context, o UplinkOptions) (*Uplinks, error) {
	if o.Fleet == nil || o.Server == nil {
		return nil, errors.New("fleetroute: uplinks: Fleet and Server are required")
	}
	if !o.Server.Options.InlineClient {
		return nil, fmt.Errorf("fleetroute: uplinks: %w", mqtt.ErrInlineClientNotEnabled)
	}
	if o.MaxAge <= 0 {
		o.MaxAge = DefaultUplinkMaxAge
	}
	if o.MaxBytes <= 0 {
		o.MaxBytes = DefaultUplinkMaxBytes
	}
	if o.RetainedMaxBytes <= 0 {
		o.RetainedMaxBytes = DefaultRetainedMaxBytes
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = DefaultUplinkAckTimeout
	}
	if o.MaxAckPending <= 0 {
		o.MaxAckPending = DefaultUplinkMaxPending
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	u := &Uplinks{opts: o, id: o.Fleet.BrokerID(), nc: o.Fleet.Conn()}
	u.log = o.Logger.With("component", "fleet-uplinks")
	var err error
	if u.js, err = jetstream.New(u.nc); err != nil {
		return nil, fmt.Errorf("fleetroute: uplinks: jetstream: %w", err)
	}
	if u.m, err = newUpMetrics(o.Registerer); err != nil {
		return nil, err
	}
	var tag [6]byte
	_, _ = rand.Read(tag[:])
	u.msgTag = u.id + "-" + hex.EncodeToString(tag[:]) + "-"
	if err := u.createAssets(ctx); err != nil {
		return nil, err
	}
	return u, nil
}

// createAssets creates or updates both streams, at once, then the
// consumer.
func (u *Uplinks) createAssets(ctx context.Context) error {
	replicas := max(u.opts.Fleet.Replicas(), 1)
	dup := min(max(2*u.opts.AckTimeout, 10*time.Second), u.opts.MaxAge)
	streams := []jetstream.StreamConfig{{
		Name: UplinkStream, Description: "m2mguard uplinks routed between brokers", Subjects: []string{UplinkPrefix + ">"},
		Retention: jetstream.LimitsPolicy, Storage: jetstream.FileStorage, Replicas: replicas,
		MaxAge: u.opts.MaxAge, MaxBytes: u.opts.MaxBytes, Discard: jetstream.DiscardOld, Duplicates: dup,
	}, {
		Name: RetainedStream, Description: "m2mguard retained uplinks: the last of each topic", Subjects: []string{RetainedPrefix + ">"},
		Retention: jetstream.LimitsPolicy, Storage: jetstream.FileStorage, Replicas: replicas,
		MaxMsgsPerSubject: 1, MaxBytes: u.opts.RetainedMaxBytes, Discard: jetstream.DiscardOld, Duplicates: dup,
	}}
	errs := make([]error, len(streams))
	var wg sync.WaitGroup
	for i, sc := range streams {
		wg.Go(func() {
			err := upCreate(ctx, func(ctx context.Context) error {
				_, err := u.js.CreateOrUpdateStream(ctx, sc)
				return err
			})
			if err != nil {
				errs[i] = fmt.Errorf("fleetroute: stream %s: %w", sc.Name, err)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	cc := jetstream.ConsumerConfig{
		Durable: uplinkConsumer + u.id, Description: "m2mguard uplinks for broker " + u.id,
		DeliverPolicy: jetstream.DeliverNewPolicy, AckPolicy: jetstream.AckExplicitPolicy,
		AckWait: upAckWait, MaxAckPending: u.opts.MaxAckPending, InactiveThreshold: u.opts.MaxAge,
		FilterSubject: UplinkPrefix + ">",
	}
	err := upCreate(ctx, func(ctx context.Context) (err error) {
		u.cons, err = u.js.CreateOrUpdateConsumer(ctx, UplinkStream, cc)
		return err
	})
	if err != nil {
		return fmt.Errorf("fleetroute: consumer %s: %w", cc.Durable, err)
	}
	return nil
}

// upCreate is createRetry with attempts of at most 2 s, and 5 s in all if
// ctx has no deadline.
func upCreate(ctx context.Context, fn func(ctx context.Context) error) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	return createRetry(ctx, 2*time.Second, fn)
}

// upRetry is retry with attempts of at most 2 s, and 5 s in all if ctx
// has no deadline.
func upRetry(ctx context.Context, fn func(ctx context.Context) error) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	return retry(ctx, 2*time.Second, fn)
}

// ID is the hook's id for mochi.
func (u *Uplinks) ID() string { return "m2mguard-fleet-uplinks" }

// Provides tells mochi the events the hook handles.
func (u *Uplinks) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnWillSent
}

// Start loads the fleet's retained uplinks into the server (call it after
// the server's Serve, which restores the session store's) and starts
// consuming the other brokers' uplinks. ctx bounds the loading only.
func (u *Uplinks) Start(ctx context.Context) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed || u.started {
		return errors.New("fleetroute: uplinks: started or closed")
	}
	u.started = true
	if err := u.loadRetained(ctx); err != nil {
		// Not fatal: live uplinks still flow; the set is loaded at the
		// next start.
		u.m.failures.WithLabelValues("retained-load").Inc()
		u.log.Warn("fleet retained uplinks not loaded", "error", err)
	}
	cc, err := u.cons.Consume(u.inject,
		jetstream.PullMaxMessages(min(u.opts.MaxAckPending, 512)), jetstream.PullExpiry(5*time.Second), jetstream.PullHeartbeat(time.Second),
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
			if !errors.Is(err, jetstream.ErrNoHeartbeat) {
				u.log.Debug("fleet uplink consumer", "error", err)
			}
		}))
	if err != nil {
		return fmt.Errorf("fleetroute: uplinks: consume: %w", err)
	}
	u.cc = cc
	return nil
}

// Close stops consuming and waits for the message being injected, if any.
// Publishes from the broker's clients are still forwarded afterwards
// (while the fleet's connection is open): close the server after it.
func (u *Uplinks) Close() error {
	u.mu.Lock()
	cc := u.cc
	u.cc, u.closed = nil, true
	u.mu.Unlock()
	if cc != nil {
		cc.Stop()
		<-cc.Closed()
	}
	return nil
}

// OnPublish forwards an uplink of a client of this broker to the fleet.
// The m2mguard hook before it has opened the envelope: the payload is the
// plaintext the local applications receive. At QoS 1 and 2 it returns
// only once JetStream has stored the message (mochi acknowledges the
// publish after this hook), so a message acknowledged to a terminal is in
// the stream even if this broker fails the next moment. If JetStream does
// not answer within AckTimeout the publish is refused: the client is
// disconnected without an acknowledgement (an MQTT 5 client with DISCONNECT
// 0x89 server busy) and sends the message again after it reconnects
// (the reference client reports ErrSessionEnded and the caller publishes
// again). At QoS 0 it publishes without waiting, and delivers locally
// whatever happens.
func (u *Uplinks) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil // injected by this hook, or the platform's own
	}
	if kind, _ := codec.ParseTopic(pk.TopicName); kind != codec.TopicUp {
		return pk, nil
	}
	err := u.forward(pk, "publish", pk.FixedHeader.Qos > 0)
	if err == nil || pk.FixedHeader.Qos == 0 || errors.Is(err, ErrSubject) || errors.Is(err, ErrTooLarge) {
		// A topic no subject can carry, or a message larger than NATS
		// carries, is delivered on this broker only (counted): refusing
		// it would have the client send it again forever.
		return pk, nil
	}
	u.m.refused.Inc()
	u.log.Warn("m2mguard fleet_uplink_refused", "event", "fleet_uplink_refused", "client", cl.ID, "error", err)
	if cl.Properties.ProtocolVersion == 5 {
		_ = u.opts.Server.DisconnectClient(cl, packets.ErrServerBusy)
	} else {
		cl.Stop(packets.ErrServerBusy) // 3.1.1 has no DISCONNECT from the server: the connection closes
	}
	// No PUBACK, nothing delivered or retained here. (A bare code, not
	// wrapped: mochi asserts the type of an MQTT 5 publish's error.)
	return pk, packets.ErrRejectPacket
}

// OnWillSent forwards a client's will, which mochi sent without passing
// OnPublish, once it has been delivered locally. Nobody waits for it: it
// is published with a bounded wait for JetStream's acknowledgement and
// counted if that fails.
func (u *Uplinks) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	if kind, _ := codec.ParseTopic(pk.TopicName); kind != codec.TopicUp {
		return // also a will the m2mguard hook refused (emptied)
	}
	// Waited for at any QoS: the client is gone, this is the only chance.
	if err := u.forward(pk, "will", true); err != nil {
		u.log.Warn("fleet will not forwarded", "client", cl.ID, "error", err)
	}
}

// forward publishes pk on the uplink stream and, if retained, on the
// retained stream: without wait on core NATS, else waiting for both
// acknowledgements (retried within AckTimeout; message ids make a retry
// stored once).
func (u *Uplinks) forward(pk packets.Packet, kind string, wait bool) error {
	subj, err := TopicSubject(UplinkPrefix, pk.TopicName)
	if err != nil {
		u.m.failures.WithLabelValues("topic").Inc()
		return err
	}
	if limit := u.nc.MaxPayload(); limit > 0 && int64(len(pk.Payload)+len(subj)+256) > limit {
		u.m.failures.WithLabelValues("too-large").Inc()
		return fmt.Errorf("%w: %d bytes", ErrTooLarge, len(pk.Payload))
	}
	msg := u.message(subj, pk, kind)
	var ret *nats.Msg
	if pk.FixedHeader.Retain {
		rsubj, err := TopicSubject(RetainedPrefix, pk.TopicName)
		if err != nil {
			u.m.failures.WithLabelValues("topic").Inc()
			return err
		}
		ret = u.message(rsubj, pk, kind)
	}
	if !wait {
		// Core NATS: the stream stores what reaches it, nobody waits.
		for _, m := range []*nats.Msg{ret, msg} {
			if m == nil {
				continue
			}
			if err := u.nc.PublishMsg(m); err != nil {
				u.m.failures.WithLabelValues("forward").Inc()
				return fmt.Errorf("fleetroute: forward: %w", err)
			}
		}
		u.m.forwarded.WithLabelValues(kind).Inc()
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), u.opts.AckTimeout)
	defer cancel()
	for _, m := range []*nats.Msg{ret, msg} { // retained first: the live message then finds it stored
		if m == nil {
			continue
		}
		id := u.msgTag + strconv.FormatUint(u.msgSeq.Add(1), 10)
		err := upRetry(ctx, func(ctx context.Context) error {
			_, err := u.js.PublishMsg(ctx, m, jetstream.WithMsgID(id))
			return err
		})
		if err != nil {
			u.m.failures.WithLabelValues("forward").Inc()
			return fmt.Errorf("fleetroute: forward: %w", err)
		}
	}
	u.m.forwarded.WithLabelValues(kind).Inc()
	return nil
}

// message is the NATS message of pk on subject subj.
func (u *Uplinks) message(subj string, pk packets.Packet, kind string) *nats.Msg {
	h := nats.Header{}
	h.Set(upHdrOrigin, u.id)
	h.Set(upHdrQoS, strconv.Itoa(int(min(pk.FixedHeader.Qos, 2))))
	if pk.FixedHeader.Retain {
		h.Set(upHdrRetain, "1")
	}
	if kind == "will" {
		h.Set(upHdrWill, "1")
	}
	return &nats.Msg{Subject: subj, Data: pk.Payload, Header: h}
}

// inject delivers a message of the uplink stream published through
// another broker to this broker's subscribers, through mochi's inline
// client (mochi checks every recipient's ACL), then acknowledges it. The
// consumer calls it on one goroutine, in the stream's order.
func (u *Uplinks) inject(m jetstream.Msg) {
	h := m.Headers()
	if h.Get(upHdrOrigin) == u.id {
		_ = m.Ack() // this broker's own: mochi delivered it here already
		return
	}
	topic, qos, retain, err := decodeUplink(m.Subject(), h)
	if err != nil {
		u.m.failures.WithLabelValues("decode").Inc()
		u.log.Warn("fleet uplink refused", "subject", m.Subject(), "error", err)
		_ = m.Term()
		return
	}
	if err := u.opts.Server.Publish(topic, m.Data(), retain, qos); err != nil {
		u.m.failures.WithLabelValues("inject").Inc()
		u.log.Warn("fleet uplink not injected", "topic", topic, "error", err)
		_ = m.NakWithDelay(time.Second)
		return
	}
	u.m.injected.Inc()
	_ = m.Ack()
}

// decodeUplink reads the topic, QoS and retain flag of a routed uplink.
func decodeUplink(subject string, h nats.Header) (topic string, qos byte, retain bool, err error) {
	prefix := UplinkPrefix
	if len(subject) >= len(RetainedPrefix) && subject[:len(RetainedPrefix)] == RetainedPrefix {
		prefix = RetainedPrefix
	}
	topic, err = SubjectTopic(prefix, subject)
	if err != nil {
		return "", 0, false, err
	}
	if kind, _ := codec.ParseTopic(topic); kind != codec.TopicUp {
		return "", 0, false, fmt.Errorf("%w: not an uplink topic", ErrSubject)
	}
	switch h.Get(upHdrQoS) {
	case "0", "":
	case "1":
		qos = 1
	case "2":
		qos = 2
	default:
		return "", 0, false, fmt.Errorf("%w: qos header", ErrSubject)
	}
	return topic, qos, h.Get(upHdrRetain) == "1", nil
}

// loadRetained reads the last message of every subject of the retained
// stream and sets (or, for an empty payload, clears) the server's retained
// message of its topic, without delivering it to anyone: what a client
// subscribing from now on receives as retained. mochi's session store is
// not told (the set is loaded from the fleet at every start).
func (u *Uplinks) loadRetained(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, defaultRetainedLoadLimit)
	defer cancel()
	oc, err := u.js.OrderedConsumer(ctx, RetainedStream, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverLastPerSubjectPolicy,
	})
	if err != nil {
		return fmt.Errorf("fleetroute: retained: %w", err)
	}
	info, err := oc.Info(ctx)
	if err != nil {
		return fmt.Errorf("fleetroute: retained: %w", err)
	}
	if info.NumPending == 0 {
		return nil
	}
	it, err := oc.Messages()
	if err != nil {
		return fmt.Errorf("fleetroute: retained: %w", err)
	}
	defer it.Stop()
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	n := 0
	for {
		m, err := it.Next()
		if err != nil {
			return fmt.Errorf("fleetroute: retained after %d: %w", n, err)
		}
		meta, err := m.Metadata()
		if err != nil {
			return fmt.Errorf("fleetroute: retained: %w", err)
		}
		topic, qos, _, err := decodeUplink(m.Subject(), m.Headers())
		if err != nil {
			u.m.failures.WithLabelValues("decode").Inc()
		} else {
			u.opts.Server.Topics.RetainMessage(packets.Packet{
				FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos, Retain: true},
				TopicName:   topic, Payload: bytes.Clone(m.Data()), Created: meta.Timestamp.Unix(),
			})
			n++
		}
		if meta.NumPending == 0 {
			u.log.Info("fleet retained uplinks loaded", "topics", n)
			return nil
		}
	}
}

// upMetrics are the uplink routing's metrics.
type upMetrics struct {
	forwarded *prometheus.CounterVec
	injected  prometheus.Counter
	refused   prometheus.Counter
	failures  *prometheus.CounterVec
}

func newUpMetrics(reg prometheus.Registerer) (*upMetrics, error) {
	m := &upMetrics{
		forwarded: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "m2mguard_fleet_route_uplinks_forwarded_total",
			Help: "Uplinks of this broker's clients stored on the fleet's uplink stream, by kind (publish, will)."}, []string{"kind"}),
		injected: prometheus.NewCounter(prometheus.CounterOpts{Name: "m2mguard_fleet_route_uplinks_injected_total",
			Help: "Uplinks published through other brokers delivered to this broker's subscribers."}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{Name: "m2mguard_fleet_route_uplinks_refused_total",
			Help: "QoS 1 and 2 uplinks refused (client disconnected unacknowledged) because the fleet's stream did not store them in time."}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "m2mguard_fleet_route_uplinks_failures_total",
			Help: "Uplink routing failures by stage: forward, topic (no subject can carry it) and too-large (over NATS's max_payload): both delivered locally only, decode, inject, retained-load."}, []string{"stage"}),
	}
	for _, k := range []string{"publish", "will"} {
		m.forwarded.WithLabelValues(k)
	}
	for _, s := range []string{"forward", "topic", "too-large", "decode", "inject", "retained-load"} {
		m.failures.WithLabelValues(s)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.forwarded, m.injected, m.refused, m.failures} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("fleetroute: metrics: %w", err)
			}
		}
	}
	return m, nil
}

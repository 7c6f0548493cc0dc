// Package hook makes a mochi-mqtt v2 server an M2M1 platform (docs/SPEC.md
// sections 3 to 6): it authenticates terminals and applications at CONNECT,
// enforces the topic rules of section 4, issues session keys, and opens and
// seals the data envelopes of section 6.
//
// An embedder adds it with a few lines:
//
//	server := mqtt.New(&mqtt.Options{InlineClient: true})
//	h, err := hook.New(hook.Options{Registry: svc, Server: server})
//	if err != nil { ... }
//	server.AddHook(h, nil)
//
// Add no other auth or ACL hook beside it: mochi ORs their answers, so an
// allow-all hook would open every door this one closes.
package hook

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/lastseen"
	"github.com/m2mguard/m2mguard/replay"
	"github.com/m2mguard/m2mguard/sms"
)

// Registry is what the hook needs of the key service; *keysvc.Service
// implements it. Lookup is called on every terminal CONNECT and must be
// served from a cache.
type Registry interface {
	Lookup(ctx context.Context, sn string) (*keysvc.Terminal, error)
	Get(ctx context.Context, sn string) (*keysvc.Terminal, error) // fresh, for control messages
	CommitChange(ctx context.Context, sn string, rid codec.ID) (*keysvc.Terminal, error)
	StartChange(ctx context.Context, sn string, req keysvc.ChangeRequest) (*keysvc.Change, error)
	MarkDelivered(ctx context.Context, sn string, rid codec.ID, mode codec.Mode) (*keysvc.Terminal, error)
	ExpireChange(ctx context.Context, sn string) (bool, error)
	NewSessionKey(ctx context.Context, sn string) ([]byte, error) // a fresh key, the caller's: the session keeps it
	VerifyApp(ctx context.Context, name string, password []byte) (*keysvc.App, error)
	GetApp(ctx context.Context, name string) (*keysvc.App, error) // the reach of a session restored after a restart
}

// Options configure a Hook. Registry and Server are required. A zero
// number or duration takes its value from DefaultOptions (the values of
// docs/SPEC.md); a nil interface or function is replaced as its comment
// says.
type Options struct {
	Registry Registry
	Server   *mqtt.Server // the server the hook is added to: key delivery and session ends go through it

	// SMS is the gateway for credential changes in plaintext (SPEC section
	// 7); nil means no SMS channel: changes go in ciphertext or not at all.
	SMS sms.Sender
	// SMSOnRequest honours a terminal's request for a change by SMS even
	// when ciphertext is possible (its basic key in sync). Off by default:
	// an SMS carries the new passwords and basic key in plaintext, so the
	// platform uses it only when ciphertext is impossible.
	SMSOnRequest bool
	// RenewBefore starts a change of a password or basic key this long
	// before it expires (and at any login inside the grace period after);
	// 0 = Grace (derived in New, so it follows a Grace of the caller's).
	RenewBefore time.Duration
	// SMSRetry is the first wait after a failed SMS send; it doubles up to
	// 5 minutes until the change's deadline.
	SMSRetry time.Duration

	Skew            time.Duration // allowed |now - ts| at login
	Grace           time.Duration // login still allowed after up expired
	SessionLifetime time.Duration // a session key's life (exp - T)
	StoreTimeout    time.Duration // per registry call
	Throttle        ThrottleOptions
	// Apps bounds the cost of application logins (argon2id) before they
	// are authenticated; the zero value keeps it on half the CPUs.
	Apps AppLimitOptions

	// ClaimTimeout bounds one replay claim (ReplayGuard.Claim) of a login
	// or control message, apart from StoreTimeout: a fleet's claim retries
	// through a JetStream leader election (fleet.Options.ClaimTimeout, 2
	// s) and must not run out of the login's store budget meanwhile.
	ClaimTimeout time.Duration

	// ReplayGuard remembers the nonces of accepted logins and control
	// messages; nil = one in memory (replay.NewMemory), lost at a restart.
	// A broker that restarts within the skew window needs one that
	// persists (replay.Open); the caller owns it and closes it after the
	// server.
	ReplayGuard ReplayGuard
	// Throttler counts login failures; nil = the hook's bounded table,
	// configured by Throttle.
	Throttler Throttler
	// Directory is told of every session that starts and ends, for a
	// fleet of brokers (see SessionDirectory); nil = none.
	Directory SessionDirectory
	// ChangeBook keeps the deadlines of pending changes and the SMS sends
	// in progress (see ChangeBook); nil = in memory, this broker's own.
	ChangeBook ChangeBook
	// LastSeen records every accepted terminal login (when, from where,
	// MQTT version, session key): a *lastseen.Table, or a fleet's shared
	// state. It is called on the login path and must not block; nil = none.
	LastSeen LastSeenRecorder
	// Storage is the storage hook added to the same server, if any
	// (sessionstore): the hook tells it of the messages and subscriptions
	// it takes out of a resumed session and of the downlink it holds back,
	// which mochi does not report, so that a restart restores a session
	// as the hook left it (restore.go). nil = no storage hook.
	Storage Storage
	// OnDownlinkReady is called with a terminal's sn whenever its session
	// on this broker may have become ready to receive downlink data
	// (DownlinkReady, downready.go), for a deliverer outside mochi's topic
	// tree (a fleet's downlink routing). It runs on connection and writer
	// goroutines and must not block; nil = none.
	OnDownlinkReady func(sn string)
	// OnDownlinksDiscarded receives the downlink data of a terminal's
	// MQTT session that the hook discards because a login on another
	// broker took the session over (TakenOver): the messages in flight
	// to it, unacknowledged, and those it withheld, in plaintext, oldest
	// first, so that a fleet can put them back on the terminal's way. It
	// must not block; nil = they are lost with the session.
	OnDownlinksDiscarded func(sn string, msgs []packets.Packet)

	// MaxEnvelopeFailures is how many envelopes of one session may fail
	// before the session is ended.
	MaxEnvelopeFailures int
	// MaxControlRefusals is how many control messages of one session may
	// be refused (each answered with an err) before the session is ended.
	// A genuine terminal needs one or two at most.
	MaxControlRefusals int

	// WriteTimeout bounds one write of a key-topic message: a terminal
	// that does not read for that long is disconnected.
	WriteTimeout time.Duration
	// DisconnectTimeout bounds how long ending a connection (takeover,
	// admin, session expiry, abuse) waits for mochi to write the
	// DISCONNECT before it closes the socket without it.
	DisconnectTimeout time.Duration
	// EventRate caps the security events an attacker can trigger in bulk
	// (login_refused, binding_mismatch, control_refused, envelope_refused,
	// session_abandoned) at this many per second per event name; the rest
	// are counted in one events_suppressed event per name and second.
	// Metrics count every one.
	EventRate int

	// Events receives the presence and security events of terminals for
	// applications (package events, docs/EVENTS.md); nil = none. The hook
	// calls it on login paths and read goroutines: it must not block
	// (events.Queue drops what it cannot take).
	Events events.Sink
	// RefusalEventRate caps the login_refused and binding_mismatch events
	// handed to Events at this many per second, all terminals together.
	// They are emitted only for known terminals (an unknown serial number
	// or a login refused before its record is read gives none), but anyone
	// who knows serial numbers can fail logins at will; the rest are
	// counted in m2mguard_events_total{result="suppressed"}.
	RefusalEventRate int

	Now        func() time.Time      // nil = time.Now
	Rand       io.Reader             // nil = crypto/rand.Reader
	Logger     *slog.Logger          // security events; nil = slog.Default()
	Registerer prometheus.Registerer // metrics; nil = a private registry, see Hook.Gatherer
}

// LastSeenRecorder takes the accepted logins of terminals (package
// lastseen's Book has it). Seen must neither block nor do I/O.
type LastSeenRecorder interface {
	Seen(sn string, e lastseen.Entry)
}

// Hook is the M2M1 platform hook. Create it with New.
type Hook struct {
	mqtt.HookBase
	opts     Options
	reg      Registry
	server   *mqtt.Server
	log      *slog.Logger
	metrics  *metrics
	gatherer prometheus.Gatherer

	sessions sync.Map      // *mqtt.Client → *session, for every authenticated connection
	pending  pendingLogins // logins not yet established (lifecycle.go)
	offline  sync.Map      // ClientID → *session (identity only) of persistent sessions whose client is gone
	replay   ReplayGuard
	throttle Throttler
	apps     *appLimiter
	changes  *changeDesk // credential changes (changes.go)
	writer   *writer     // every write to a client and end of a connection (writes.go)
	revoked  revocations
	seq      atomic.Uint64 // the last session's SessionRef.Seq
	events   *eventLimiter
	sink     appEvents // events for applications (appevents.go)
	crew     *crew     // owns every goroutine of the hook; Stop stops it (lifecycle.go)
}

// DefaultOptions returns the value New gives each zero number and
// duration of Options. RenewBefore stays zero (it follows Grace); in Apps,
// the budgets that follow the CPUs stay zero too (see AppLimitOptions).
func DefaultOptions() Options {
	return Options{
		SMSRetry:            5 * time.Second,
		Skew:                300 * time.Second, // SPEC section 3, step 5
		Grace:               7 * 24 * time.Hour,
		SessionLifetime:     24 * time.Hour,
		StoreTimeout:        2 * time.Second,
		ClaimTimeout:        3 * time.Second,
		Throttle:            DefaultThrottleOptions(),
		Apps:                DefaultAppLimitOptions(),
		MaxEnvelopeFailures: 3,
		MaxControlRefusals:  8,
		WriteTimeout:        10 * time.Second,
		DisconnectTimeout:   500 * time.Millisecond,
		EventRate:           20,
		RefusalEventRate:    20,
	}
}

// New validates the options and returns the hook.
func New(opts Options) (*Hook, error) {
	if opts.Registry == nil || opts.Server == nil {
		return nil, errors.New("hook: Options.Registry and Options.Server are required")
	}
	def := DefaultOptions()
	orDefault(&opts.Skew, def.Skew)
	orDefault(&opts.Grace, def.Grace)
	orDefault(&opts.SessionLifetime, def.SessionLifetime)
	orDefault(&opts.StoreTimeout, def.StoreTimeout)
	orDefault(&opts.ClaimTimeout, def.ClaimTimeout)
	orDefault(&opts.RenewBefore, opts.Grace)
	orDefault(&opts.SMSRetry, def.SMSRetry)
	orDefault(&opts.MaxEnvelopeFailures, def.MaxEnvelopeFailures)
	orDefault(&opts.MaxControlRefusals, def.MaxControlRefusals)
	orDefault(&opts.WriteTimeout, def.WriteTimeout)
	orDefault(&opts.DisconnectTimeout, def.DisconnectTimeout)
	orDefault(&opts.EventRate, def.EventRate)
	orDefault(&opts.RefusalEventRate, def.RefusalEventRate)
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Rand == nil {
		opts.Rand = rand.Reader
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	opts.Throttle = opts.Throttle.withDefaults()
	if opts.ReplayGuard == nil {
		opts.ReplayGuard = replay.NewMemory(replay.Options{Now: opts.Now, Logger: opts.Logger})
	}
	if opts.Throttler == nil {
		opts.Throttler = newThrottleTable(opts.Throttle)
	}
	h := &Hook{
		opts:     opts,
		reg:      opts.Registry,
		server:   opts.Server,
		log:      opts.Logger,
		replay:   opts.ReplayGuard,
		throttle: opts.Throttler,
		apps:     newAppLimiter(opts.Apps),
		events:   newEventLimiter(opts.EventRate, floodEvents...),
		pending:  pendingLogins{m: map[*mqtt.Client]*session{}},
		crew:     newCrew(),
	}
	h.writer = &writer{crew: h.crew, server: h.server, event: h.event,
		writeTimeout: opts.WriteTimeout, disconnectTimeout: opts.DisconnectTimeout}
	h.writer.afterKey = func(cl *mqtt.Client, s *session) {
		s.keyWritten.Store(true)
		h.releaseAfterKey(cl, s) // what the session inherited goes first
		h.downlinkMaybeReady(cl, s)
	}
	registerer := opts.Registerer
	if registerer == nil {
		r := prometheus.NewRegistry()
		registerer, h.gatherer = r, r
	}
	m, err := newMetrics(registerer, opts.Registry)
	if err != nil {
		return nil, fmt.Errorf("hook: metrics: %w", err)
	}
	h.metrics = m
	h.sink = newAppEvents(opts.Events, opts.RefusalEventRate, m.appEvents, opts.Now)
	h.changes = newChangeDesk(opts, m, changeLink{
		online:     h.online,
		sendKey:    func(c termConn, payload []byte) { h.writer.sendKey(c.cl, c.s, payload) },
		endSession: func(c termConn, reason string, code packets.Code) { h.writer.endSession(c.cl, c.s, reason, code) },
		revoke:     h.Revoke,
		claim:      h.claim,
		event:      h.event,
		emit:       h.sink.emit,
		crew:       h.crew,
	})
	if err := registerGuardGauges(registerer, opts.Throttler, opts.ReplayGuard); err != nil {
		return nil, fmt.Errorf("hook: metrics: %w", err)
	}
	for _, c := range h.apps.collectors() {
		if err := registerer.Register(c); err != nil {
			return nil, fmt.Errorf("hook: metrics: %w", err)
		}
	}
	return h, nil
}

// ID names the hook to mochi.
func (h *Hook) ID() string { return "m2mguard" }

// Provides lists the events the hook handles.
func (h *Hook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnSessionEstablish, mqtt.OnSessionEstablished,
		mqtt.OnSubscribed, mqtt.OnDisconnect, mqtt.OnClientExpired, mqtt.OnPublish, mqtt.OnPublished,
		mqtt.OnPacketEncode, mqtt.OnWill:
		return true
	}
	return false
}

// Gatherer returns the private metrics registry when Options.Registerer was
// nil (serve it on /metrics), else nil.
func (h *Hook) Gatherer() prometheus.Gatherer { return h.gatherer }

func (h *Hook) session(cl *mqtt.Client) *session {
	s, ok := h.sessions.Load(cl)
	if !ok {
		return nil
	}
	return s.(*session)
}

// event logs a security event. Attributes never carry secrets. It hands
// the record to the handler itself: Logger.Log would also walk the stack
// for a source position nobody asked for, once per login. Events an
// attacker can trigger in bulk are capped (floodEvents).
func (h *Hook) event(level slog.Level, name string, attrs ...any) {
	r, ok := h.eventRecord(level, name)
	if !ok {
		return
	}
	r.Add(attrs...)
	_ = h.log.Handler().Handle(context.Background(), r)
}

// eventAttrs is event for the per-login events (login_accepted,
// login_refused): typed attributes cost no allocation where the key-value
// pairs of event cost one per string value, and none is built for an
// event the cap drops.
func (h *Hook) eventAttrs(level slog.Level, name string, attrs ...slog.Attr) {
	r, ok := h.eventRecord(level, name)
	if !ok {
		return
	}
	r.AddAttrs(attrs...)
	_ = h.log.Handler().Handle(context.Background(), r)
}

// eventRecord starts the record of an event, if the handler takes the
// level and the event's cap allows it.
func (h *Hook) eventRecord(level slog.Level, name string) (slog.Record, bool) {
	if !h.log.Handler().Enabled(context.Background(), level) {
		return slog.Record{}, false
	}
	now := time.Now()
	if !h.events.allow(name, now) {
		return slog.Record{}, false
	}
	r := slog.NewRecord(now, level, eventMessage(name), 0)
	r.AddAttrs(slog.String("event", name))
	return r, true
}

// eventMessages are the messages of the hook's events, "m2mguard " and the
// name, made once.
var eventMessages = func() map[string]string {
	m := map[string]string{}
	for _, name := range []string{
		"login_accepted", "login_refused", "binding_mismatch", "will_refused", "session_ended",
		"session_abandoned", "control_refused", "envelope_refused", "events_suppressed",
		"basic_key_refused", "session_key_failed", "key_message_failed", "key_delivery_failed",
	} {
		m[name] = "m2mguard " + name
	}
	return m
}()

// eventMessage is the record message of an event.
func eventMessage(name string) string {
	if m, ok := eventMessages[name]; ok {
		return m
	}
	return "m2mguard " + name
}

// refuse answers a CONNECT with the CONNACK code and closes the
// connection. Under MQTT 3.1.1 every refusal is 0x05 (SPEC section 3).
func (h *Hook) refuse(cl *mqtt.Client, code packets.Code) error {
	if cl.Properties.ProtocolVersion < 5 {
		code = packets.ErrBadUsernameOrPassword // sent as 3.1.1's 0x05 not authorized
	}
	if err := h.server.SendConnack(cl, code, false, nil); err != nil {
		return fmt.Errorf("hook: connack: %w", err)
	}
	if err, ok := refusalErrors[code]; ok {
		return err
	}
	return code
}

// refusalErrors are the CONNACK codes of refusals as error values, made
// once: a packets.Code (a string and a byte) costs an allocation each time
// it becomes an error.
var refusalErrors = func() map[packets.Code]error {
	m := map[packets.Code]error{}
	for _, c := range []packets.Code{packets.ErrBadUsernameOrPassword, packets.ErrNotAuthorized, packets.ErrBanned,
		packets.ErrServerUnavailable, packets.ErrServerBusy} {
		m[c] = c
	}
	return m
}()

// OnConnect authenticates the client. It runs before
// OnConnectAuthenticate so that it can choose the CONNACK code of a
// refusal (0x86, 0x87, 0x88, 0x89 or 0x8A under MQTT 5); a refused client gets its
// CONNACK here and the connection is closed.
func (h *Hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	s, code := h.authenticate(cl, pk)
	if s == nil {
		return h.refuse(cl, code)
	}
	s.seq = h.seq.Add(1)
	h.sessions.Store(cl, s)
	if s.kind == kindTerminal && h.revoked.since(s.sn, s.revokeSeq) {
		// An operator revoked the terminal while this login was deciding
		// on the record it had read before; Revoke may not have seen the
		// session, which was not registered yet.
		h.sessions.Delete(cl)
		h.refusedKnown(s.sn, remoteHost(cl.Net.Remote), reasonDisabled, slog.Bool("revoked", true))
		return h.refuse(cl, packets.ErrNotAuthorized)
	}
	h.pending.add(cl, s)
	h.offline.Delete(cl.ID)
	if s.kind == kindTerminal && h.opts.LastSeen != nil {
		h.opts.LastSeen.Seen(s.sn, lastseen.Entry{At: h.opts.Now(), Remote: cl.Net.Remote,
			Protocol: cl.Properties.ProtocolVersion, SessionKey: s.hasKey()})
	}
	return nil
}

// OnConnectAuthenticate accepts exactly the clients OnConnect authenticated.
func (h *Hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	return h.session(cl) != nil
}

// OnSessionEstablish runs in the new login's goroutine just before mochi
// takes over an existing connection with the same ClientID, which writes
// it a DISCONNECT: if that connection does not read, the write would block
// the login for as long as the connection lives. It is ended here first,
// within DisconnectTimeout; mochi then finds it closed. Downlink a keyless
// predecessor withheld is handed to the new connection (inherit.go).
func (h *Hook) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	h.endTakenOver(cl)
	h.takeOverParked(cl, pk)
}

func (h *Hook) endTakenOver(cl *mqtt.Client) {
	if old, ok := h.server.Clients.Get(cl.ID); ok && old != cl && !old.Closed() {
		h.writer.endConnection(old, packets.ErrSessionTakenOver)
	}
}

// OnSessionEstablished counts the session (its CONNACK is out), delivers
// a waiting key message to a terminal that is already subscribed to its
// key topic from an earlier persistent session, and arms the end of the
// session at the key's exp.
func (h *Hook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	s := h.session(cl)
	if s == nil {
		return
	}
	// since is written before the state says established: Sessions reads
	// it once it sees the state (the atomic orders the two).
	if s.state.Load() == statePending {
		s.since = h.opts.Now()
	}
	if !s.state.CompareAndSwap(statePending, stateEstablished) {
		return // the housekeeping sweep found its connection closed already
	}
	h.pending.remove(cl)
	h.metrics.sessionsOf(s.kind).Inc()
	if h.opts.Directory != nil {
		h.opts.Directory.SessionStarted(SessionRef{cl.ID, s.seq}, h.info(cl, s))
	}
	if s.kind != kindTerminal {
		return
	}
	h.sink.emit(h.sink.event(events.Connected, s.sn))
	if !s.exp.IsZero() {
		d := s.exp.Sub(h.opts.Now())
		s.timer = time.AfterFunc(d, func() {
			h.crew.spawn(func() { h.writer.endSession(cl, s, "key-expired", packets.ErrMaxConnectTime) })
		})
	}
	if _, ok := cl.State.Subscriptions.Get(s.keyTopic); ok {
		h.writer.keySubscribed(cl, s)
	}
	h.changes.deliverPending(termConn{cl, s})
	h.downlinkMaybeReady(cl, s) // a resumed session subscribed already (a keyless one is ready now)
}

// OnSubscribed delivers the waiting key message once the terminal has
// subscribed to its key topic, and tells Options.OnDownlinkReady of a
// granted subscription to downlink data.
func (h *Hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	s := h.session(cl)
	if s == nil || s.kind != kindTerminal {
		return
	}
	down := false
	for i, f := range pk.Filters {
		if i >= len(reasonCodes) || reasonCodes[i] >= 0x80 {
			continue
		}
		if f.Filter == s.keyTopic {
			h.writer.keySubscribed(cl, s)
		} else if filterWithin(f.Filter, s.downFilter) {
			down = true
		}
	}
	if down {
		h.downlinkMaybeReady(cl, s)
	}
}

// OnDisconnect forgets the connection's session. If the MQTT session
// persists, its identity (not its key) is kept, so that messages queued for
// it pass the per-recipient ACL and are sealed for the next session.
// Downlink the connection withheld goes back into the MQTT session first
// (inherit.go); both happen before the session is forgotten, so that
// neither a message for the session nor a connection taking it over finds
// it in between. mochi also reports here each session it restored from a
// storage hook at start, a client without a connection (restore.go).
func (h *Hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	s := h.session(cl)
	if s == nil {
		if cl.Net.Conn == nil && !expire {
			h.noteRestored(cl) // a session a storage hook restored at start (restore.go)
		}
		return
	}
	switch s.state.Swap(stateEnded) {
	case stateEnded:
		return // forgotten already
	case statePending: // not established (only a direct caller gets here)
		h.pending.remove(cl)
	case stateEstablished:
		h.metrics.sessionsOf(s.kind).Dec()
		if h.opts.Directory != nil {
			h.opts.Directory.SessionEnded(SessionRef{cl.ID, s.seq})
		}
		if s.kind == kindTerminal && h.sink.enabled() {
			e := h.sink.event(events.Disconnected, s.sn)
			e.Reason = disconnectReason(cl, s, err)
			h.sink.emit(e)
		}
	}
	if s.timer != nil {
		s.timer.Stop()
	}
	switch {
	case cl.IsTakenOver():
	case s.takenOver.Load():
		// A login on another broker took the session over: its MQTT
		// session is not kept here (mochi keeps a persistent one). Its
		// downlink data, withheld or in flight, goes the terminal's way.
		h.handDownlinks(cl, s.takeParked())
		if !expire {
			h.discardSession(cl, false)
		}
	default:
		h.returnParked(cl, s)
		if !expire {
			h.offline.Store(cl.ID, s.identityOnly())
		}
	}
	h.sessions.Delete(cl)
}

// OnClientExpired forgets a persistent session that mochi expired.
func (h *Hook) OnClientExpired(cl *mqtt.Client) {
	h.offline.Delete(cl.ID)
}

// orDefault sets *v to def if it is zero or negative.
func orDefault[T int | float64 | time.Duration](v *T, def T) {
	if *v <= 0 {
		*v = def
	}
}

func (h *Hook) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), h.opts.StoreTimeout)
}

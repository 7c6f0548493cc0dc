package hook

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/sms"
)

// Credential changes (SPEC section 7, patent Embodiment 5). The key
// service holds the state machine (start, commit, expire; atomic and
// idempotent); the change desk decides the mode, delivers the new values
// (cfg in ciphertext, or acc plus an SMS), answers the terminal's chg and
// ack on its control topic, and has the connection closed after done, so
// that the terminal logs in with the new values. The Hook hands it what
// arrives over MQTT (a control message, a login, an operator's request)
// and keeps nothing of it.

// ErrNoChannel: the change cannot reach the terminal now: no ciphertext
// (basic key not in sync at this login, or terminal offline) and no SMS
// (no MSISDN or no gateway). A platform-initiated change waits for the
// next login that offers a channel.
var ErrNoChannel = errors.New("hook: no channel to the terminal")

// StartChange starts a platform-initiated change of what for terminal sn
// (an operator's request). If the terminal is online the new values go out
// at once; otherwise at its next login. keysvc.ErrBusy if a change is
// already pending, keysvc.ErrInactive if the terminal is disabled.
func (h *Hook) StartChange(ctx context.Context, sn string, what codec.What) (*keysvc.Change, error) {
	return h.changes.start(ctx, sn, what, "")
}

// StartChangeBy is StartChange on behalf of operator (the name of the
// admin API's token), which the change_started event names.
func (h *Hook) StartChangeBy(ctx context.Context, sn string, what codec.What, operator string) (*keysvc.Change, error) {
	return h.changes.start(ctx, sn, what, operator)
}

// ExpireChanges drops the watched changes past their deadline, keeping the
// old values, and records each expiry. The hook calls it every minute
// between Init and Stop; tests call it directly.
func (h *Hook) ExpireChanges(ctx context.Context) {
	h.changes.expireDue(ctx)
}

// OnPublished ends the connection after a committed change, once mochi has
// acknowledged the ack message and the done is written.
func (h *Hook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if s := h.session(cl); s != nil && s.kind == kindTerminal && s.closeAfter.Swap(false) {
		h.writer.endSessionAfterKeys(cl, s, "credentials-changed", packets.CodeDisconnect)
	}
}

// online returns the connection of terminal sn, if it is connected to
// this broker.
func (h *Hook) online(sn string) (termConn, bool) {
	cl, ok := h.server.Clients.Get(sn)
	if !ok || cl.Closed() {
		return termConn{}, false
	}
	s := h.session(cl)
	if s == nil || s.kind != kindTerminal {
		return termConn{}, false
	}
	return termConn{cl, s}, true
}

// termConn is a terminal's connection on this broker: mochi's client and
// the hook's session of it.
type termConn struct {
	cl *mqtt.Client
	s  *session
}

// changeLink is all the change desk uses of the rest of the hook; New
// wires it to the hook's sessions, writer and replay guard. A fleet of
// brokers plugs in at two places: online, where a terminal connected to
// another broker is found (the start is then forwarded there, request and
// reply, to run where its session is), and the expiry sweep
// (changeDesk.sweep), which a fleet runs once, not on every broker.
type changeLink struct {
	// online returns the connection of terminal sn, if it is connected.
	online func(sn string) (termConn, bool)
	// sendKey queues a message for the connection's key topic; it never
	// blocks (writes.go).
	sendKey func(c termConn, payload []byte)
	// endSession ends the connection at once (writes.go).
	endSession func(c termConn, reason string, code packets.Code)
	// revoke ends the sessions of a terminal found disabled (revoke.go).
	revoke func(sn, reason string) int
	// claim claims the nonce of a control message, as for a login
	// (guard.go).
	claim func(sn string, ts uint32, nonce codec.ID, now time.Time) (bool, error)
	// event logs a security event (hook.go).
	event func(level slog.Level, name string, attrs ...any)
	// emit hands an event to the applications' event sink (appevents.go).
	emit func(e events.Event)
	// crew runs the SMS sends, which the hook's Stop ends and waits for.
	crew *crew
}

// changeDesk runs the credential changes of SPEC section 7 for one hook.
type changeDesk struct {
	reg          Registry
	sms          sms.Sender // nil: no SMS channel
	smsOnRequest bool
	renewBefore  time.Duration
	smsRetry     time.Duration
	skew         time.Duration
	maxRefusals  int
	storeTimeout time.Duration
	now          func() time.Time
	rand         io.Reader

	changes *prometheus.CounterVec // m2mguard_changes_total{event, detail}
	replays *prometheus.CounterVec // m2mguard_replays_total{kind}

	link  changeLink
	book  ChangeBook  // deadlines and SMS sends (state.go)
	watch changeWatch // the changes this broker started, until their deadline
}

// newChangeDesk returns the desk of a hook with opts (defaults filled in).
func newChangeDesk(opts Options, m *metrics, link changeLink) *changeDesk {
	d := &changeDesk{
		reg: opts.Registry, sms: opts.SMS, smsOnRequest: opts.SMSOnRequest,
		renewBefore: opts.RenewBefore, smsRetry: opts.SMSRetry, skew: opts.Skew,
		maxRefusals: opts.MaxControlRefusals, storeTimeout: opts.StoreTimeout,
		now: opts.Now, rand: opts.Rand,
		changes: m.changes, replays: m.replays,
		link:  link,
		watch: changeWatch{deadlines: map[string]watched{}},
	}
	d.book = opts.ChangeBook
	d.watch.shared = d.book != nil
	if d.book == nil {
		d.book = &localBook{&d.watch} // a single broker's book is its watch
	}
	return d
}

// storeCtx bounds one round of registry calls.
func (d *changeDesk) storeCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d.storeTimeout)
}

// start starts a platform-initiated change of what for terminal sn (an
// operator's request, Hook.StartChange). If the terminal is online the new
// values go out at once; otherwise at its next login.
func (d *changeDesk) start(ctx context.Context, sn string, what codec.What, operator string) (*keysvc.Change, error) {
	t, err := d.reg.Get(ctx, sn)
	if err != nil {
		return nil, err
	}
	if t.Status != keysvc.StatusActive {
		return nil, fmt.Errorf("hook: start change %s: %w", sn, keysvc.ErrInactive)
	}
	c, online := d.link.online(sn)
	mode, ok := d.chooseMode(c.s, t, codec.ModeCipher)
	if !ok {
		mode = codec.ModeCipher // recorded as wanted; decided again at delivery
	}
	ch, err := d.reg.StartChange(ctx, sn, keysvc.ChangeRequest{What: what, Mode: mode, Origin: keysvc.OriginOperator})
	if err != nil {
		return nil, err
	}
	if operator != "" {
		d.started(sn, ch, "operator", operator)
	} else {
		d.started(sn, ch)
	}
	if !online {
		// A login in progress read the record before this change and may
		// have registered its connection since: look again (the login
		// looks for this change too once established: startedDuringLogin).
		if c, online = d.link.online(sn); online {
			mode, ok = d.chooseMode(c.s, t, codec.ModeCipher)
		}
	}
	if online && ok && c.s.startSent.Swap(uint64(ch.RID)) != uint64(ch.RID) && d.deliver(c, t, ch, mode) {
		ch.Delivered = true // the caller sees what the store now holds
	}
	return ch, nil
}

// chooseMode applies SPEC section 7: ciphertext only while the basic key
// is in sync and valid (its bkd matched at this login, so s.bkSync), SMS
// only with an MSISDN and a gateway. Ciphertext wins whenever it is
// possible: an SMS carries the new values in plaintext, so it is the
// recovery channel for a terminal whose basic key is lost or expired. A
// terminal's request for SMS (preferred) is honoured over ciphertext only
// under the operator policy Options.SMSOnRequest. s is nil for a terminal
// that is not connected.
func (d *changeDesk) chooseMode(s *session, t *keysvc.Terminal, preferred codec.Mode) (codec.Mode, bool) {
	cipherOK := s != nil && s.bkSync &&
		(t.Creds.BKExp == codec.Never || d.now().Before(time.Unix(int64(t.Creds.BKExp), 0)))
	smsOK := t.MSISDN != "" && d.sms != nil
	switch {
	case preferred == codec.ModeSMS && smsOK && d.smsOnRequest:
		return codec.ModeSMS, true
	case cipherOK:
		return codec.ModeCipher, true
	case smsOK:
		return codec.ModeSMS, true
	}
	return "", false
}

// renew starts, at a login, a change for a credential of t that expires
// within RenewBefore (or expired, inside the grace period). The login
// delivers it once its session is established (deliverPending).
func (d *changeDesk) renew(s *session, t *keysvc.Terminal, now time.Time) *keysvc.Change {
	due := func(exp uint32) bool {
		return exp != codec.Never && now.Add(d.renewBefore).After(time.Unix(int64(exp), 0))
	}
	pwd := due(t.Creds.UpExp) || due(t.Creds.DownExp)
	bk := due(t.Creds.BKExp)
	var what codec.What
	switch {
	case pwd && bk:
		what = codec.WhatAll
	case pwd:
		what = codec.WhatPwd
	case bk:
		what = codec.WhatBK
	default:
		return nil
	}
	mode, ok := d.chooseMode(s, t, codec.ModeCipher)
	if !ok {
		mode = codec.ModeCipher
	}
	ctx, cancel := d.storeCtx()
	defer cancel()
	ch, err := d.reg.StartChange(ctx, t.SN, keysvc.ChangeRequest{What: what, Mode: mode, Origin: keysvc.OriginExpiry})
	switch {
	case err == nil:
		d.started(t.SN, ch)
		return ch
	case errors.Is(err, keysvc.ErrBusy):
	default:
		d.failed(t.SN, 0, "start", err)
	}
	return nil
}

// deliverPending sends, after a login, the change that waits for the
// terminal: one started while it was offline, one whose cfg may have been
// lost, or the renewal this login started. The login left the record and
// the change in the session; they are used once and dropped.
func (d *changeDesk) deliverPending(c termConn) {
	s := c.s
	t, ch := s.loginRecord, s.loginPending
	s.loginRecord, s.loginPending = nil, nil
	if ch == nil {
		if t, ch = d.startedDuringLogin(s.sn); ch == nil || s.startSent.Swap(uint64(ch.RID)) == uint64(ch.RID) {
			return
		}
	}
	if ch.Delivered && ch.Mode == codec.ModeSMS {
		// The SMS went out already: say again that it did, do not send it again.
		d.link.sendKey(c, d.sign(s, t.Creds.Down, codec.Control{Kind: codec.KindAcc, RID: ch.RID}))
		return
	}
	mode, ok := d.chooseMode(s, t, ch.Mode)
	if !ok {
		d.link.event(slog.LevelInfo, "change_waiting", "sn", s.sn, "rid", ch.RID.String(), "reason", "no channel at this login")
		return
	}
	d.deliver(c, t, ch, mode)
}

// startedDuringLogin returns the record and pending change of terminal sn
// if a change was started on this broker while the login that established
// its session was in progress: the login read the record before the
// change, and the start may have found no connection to send it on (mochi
// had not registered it yet). Only a terminal with a change this broker
// watches costs a store read.
func (d *changeDesk) startedDuringLogin(sn string) (*keysvc.Terminal, *keysvc.Change) {
	if !d.watch.has(sn, d.now()) {
		return nil, nil
	}
	ctx, cancel := d.storeCtx()
	defer cancel()
	t, err := d.reg.Get(ctx, sn)
	if err != nil || t.Pending == nil || t.Pending.Delivered || t.Pending.Expired(d.now()) {
		return nil, nil
	}
	return t, t.Pending
}

// deliver sends the new values of ch to the connected terminal by mode. It
// reports whether they were delivered already (a cfg); an SMS goes out in
// the background and is recorded when the gateway takes it.
func (d *changeDesk) deliver(c termConn, t *keysvc.Terminal, ch *keysvc.Change, mode codec.Mode) bool {
	s := c.s
	params := changeParams(ch)
	if mode == codec.ModeCipher {
		wrapped, err := codec.WrapParams(t.Creds.BK, s.sn, ch.RID, params, d.rand)
		if err != nil {
			d.failed(s.sn, ch.RID, "wrap", err)
			return false
		}
		// Recorded before it goes out: the terminal's ack can commit the
		// change as soon as the cfg arrives, and a delivery recorded after
		// that would find no change pending (a failure counted for a change
		// that succeeded, no change_delivered event or one after its
		// change_committed). If the store cannot record it, the cfg waits
		// for the next login, as an ack could not commit now either.
		if !d.markDelivered(s.sn, ch.RID, mode) {
			return false
		}
		d.link.sendKey(c, d.sign(s, t.Creds.Down, codec.Control{Kind: codec.KindCfg, RID: ch.RID, Wrapped: wrapped}))
		return true
	}
	d.link.sendKey(c, d.sign(s, t.Creds.Down, codec.Control{Kind: codec.KindAcc, RID: ch.RID}))
	msg := codec.SMS{SN: s.sn, RID: ch.RID, Params: params}
	text, err := msg.Encode()
	if err != nil {
		d.failed(s.sn, ch.RID, "sms-encode", err)
		return false
	}
	d.link.crew.spawn(func() { d.sendSMS(t.SN, t.MSISDN, ch.RID, ch.Deadline, string(text)) })
	return false
}

// changeParams are the params of SPEC section 7 for what the change replaces.
func changeParams(ch *keysvc.Change) codec.Params {
	p := codec.Params{What: ch.What}
	if ch.What.Passwords() {
		p.Up, p.UpExp, p.Down, p.DownExp = ch.New.Up, ch.New.UpExp, ch.New.Down, ch.New.DownExp
	}
	if ch.What.BasicKey() {
		p.BK, p.BKExp = ch.New.BK, ch.New.BKExp
	}
	return p
}

// sendSMS hands the text to the gateway, retrying with back-off while the
// change is pending and before its deadline, until the hook stops. The
// text is a secret: it is never logged. The change book knows of the send
// while it runs; one the hook's stop cuts short is left to the fleet.
func (d *changeDesk) sendSMS(sn, msisdn string, rid codec.ID, deadline time.Time, text string) {
	life := d.link.crew.ctx
	wait := d.smsRetry
	d.book.SMSStarted(sn, rid, deadline)
	ended := true
	defer func() {
		if ended {
			d.book.SMSEnded(sn, rid)
		}
	}()
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(life, 30*time.Second)
		err := d.sms.Send(ctx, msisdn, text)
		cancel()
		if life.Err() != nil {
			ended = false // stopped mid-send: another broker finishes it
			return
		}
		if err == nil {
			d.markDelivered(sn, rid, codec.ModeSMS)
			return
		}
		d.failed(sn, rid, "sms-send", err, "attempt", attempt)
		pause := wait
		var se *sms.StatusError
		if errors.As(err, &se) && se.RetryAfter > pause {
			pause = se.RetryAfter // the gateway asked for a longer pause than this send could wait
		}
		if !d.now().Add(pause).Before(deadline) {
			return // the change expires; the old values stay
		}
		select {
		case <-life.Done():
			ended = false
			return
		case <-time.After(pause):
		}
		if !d.stillPending(sn, rid) {
			return
		}
		wait = min(2*wait, 5*time.Minute)
	}
}

func (d *changeDesk) stillPending(sn string, rid codec.ID) bool {
	ctx, cancel := d.storeCtx()
	defer cancel()
	t, err := d.reg.Get(ctx, sn)
	return err == nil && t.Status == keysvc.StatusActive && t.Pending != nil && t.Pending.RID == rid
}

func (d *changeDesk) markDelivered(sn string, rid codec.ID, mode codec.Mode) bool {
	ctx, cancel := d.storeCtx()
	defer cancel()
	if _, err := d.reg.MarkDelivered(ctx, sn, rid, mode); err != nil {
		d.failed(sn, rid, "mark-delivered", err)
		return false
	}
	d.changes.WithLabelValues("delivered", string(mode)).Inc()
	d.link.event(slog.LevelInfo, "change_delivered", "sn", sn, "rid", rid.String(), "mode", string(mode))
	d.emit(events.ChangeDelivered, sn, rid, func(e *events.Event) { e.Mode = string(mode) })
	return true
}

// sign completes and signs a platform message with the downlink password
// down (the terminal's current one, or the new one of a done).
func (d *changeDesk) sign(s *session, down []byte, c codec.Control) []byte {
	c.Alg, c.TS = s.alg, uint32(d.now().Unix())
	payload, err := c.Sign(s.id, down)
	if err != nil { // only a bug in this package gets here
		d.link.event(slog.LevelError, "sign_failed", "sn", s.sn, "kind", string(c.Kind), "err", err.Error())
		return nil
	}
	return payload
}

// onControl handles a terminal's control message on $m2m/<sn>/ctl (the
// Hook acknowledges it and never delivers it: control messages are for
// the platform only).
func (d *changeDesk) onControl(c termConn, payload []byte) {
	s := c.s
	if s.ending.Load() {
		return // the session is being closed: no answer, no event
	}
	msg, err := codec.ParseControl(payload)
	if err != nil || !msg.Kind.Uplink() {
		d.refuse(c, nil, "bad-request", codec.CodeBadRequest)
		return
	}
	ctx, cancel := d.storeCtx()
	defer cancel()
	t, err := d.reg.Get(ctx, s.sn)
	if err != nil {
		d.failed(s.sn, 0, "lookup", err)
		return
	}
	if t.Status != keysvc.StatusActive {
		// Disabled while connected: Revoke is on its way (or the record
		// was changed in the store directly). Nothing is acted on.
		d.link.event(slog.LevelWarn, "control_refused", "sn", s.sn, "reason", "inactive")
		d.link.revoke(s.sn, RevokeDisabled)
		return
	}
	if msg.Alg != t.Alg {
		d.refuse(c, t, "alg-mismatch", codec.CodeBadRequest)
		return
	}
	if msg.Kind == codec.KindChg {
		d.onChg(ctx, c, t, &msg)
	} else {
		d.onAck(ctx, c, t, &msg)
	}
}

// fresh checks the time of an uplink control message whose digest has
// verified and claims its nonce, as for a login; it answers the error
// itself and reports false. A message whose claim fails is not acted on.
func (d *changeDesk) fresh(ctx context.Context, c termConn, t *keysvc.Terminal, msg *codec.Control) bool {
	now := d.now()
	if age := now.Sub(time.Unix(int64(msg.TS), 0)); age > d.skew || age < -d.skew {
		d.refuse(c, t, "skew", codec.CodeSkew)
		return false
	}
	switch first, err := d.link.claim(c.s.sn, msg.TS, msg.Nonce, now); {
	case err != nil:
		d.failed(c.s.sn, msg.RID, "replay-guard", err, "kind", string(msg.Kind))
		return false
	case !first:
		d.replays.WithLabelValues("control").Inc()
		d.refuse(c, t, "replay", codec.CodeReplay)
		return false
	}
	return true
}

// onChg starts the change a terminal asks for and delivers it.
func (d *changeDesk) onChg(ctx context.Context, c termConn, t *keysvc.Terminal, msg *codec.Control) {
	s := c.s
	if !msg.Verify(s.id, t.Creds.Up) {
		d.refuse(c, t, "bad-digest", codec.CodeBadRequest)
		return
	}
	if !d.fresh(ctx, c, t, msg) {
		return
	}
	if t.Pending != nil && !t.Pending.Expired(d.now()) {
		d.refuse(c, t, "busy", codec.CodeBusy)
		return
	}
	mode, ok := d.chooseMode(s, t, msg.Mode)
	if !ok {
		d.refuse(c, t, "no-channel", codec.CodeNoChannel)
		return
	}
	ch, err := d.reg.StartChange(ctx, s.sn, keysvc.ChangeRequest{What: msg.What, Mode: mode, Origin: keysvc.OriginTerminal})
	switch {
	case errors.Is(err, keysvc.ErrBusy):
		d.refuse(c, t, "busy", codec.CodeBusy)
		return
	case err != nil:
		d.failed(s.sn, 0, "start", err)
		return
	}
	d.started(s.sn, ch)
	d.deliver(c, t, ch, mode)
}

// onAck commits the change a terminal acknowledges, confirms it with done
// and has the session closed once the done is out (Hook.OnPublished).
func (d *changeDesk) onAck(ctx context.Context, c termConn, t *keysvc.Terminal, msg *codec.Control) {
	s := c.s
	if t.Pending == nil || t.Pending.RID != msg.RID {
		if msg.RID != 0 && t.LastCommitted == msg.RID && msg.Verify(s.id, t.Creds.Up) {
			// Committed already (a login with the new values did it):
			// confirm again; close only a session still on old values.
			// A stale or replayed ack gets only fresh's answer.
			if !d.fresh(ctx, c, t, msg) {
				return
			}
			d.sendDone(c, t.Creds.Down, msg.RID)
			if !sameSecret(s.down, t.Creds.Down) {
				s.closeAfter.Store(true)
			}
			return
		}
		d.refuse(c, t, "unknown-rid", codec.CodeUnknownRID)
		return
	}
	p := t.Pending
	// The ack is digested with the new uplink password and carries the bkd
	// of the new basic key (empty if bk does not change).
	if !msg.Verify(s.id, p.New.Up) {
		d.refuse(c, t, "bad-digest", codec.CodeBadRequest)
		return
	}
	bkdOK := msg.BKD == ""
	if p.What.BasicKey() {
		bkdOK = codec.BasicKeyDigestEqual(msg.BKD, t.Alg, p.New.BK, p.New.BKExp)
	}
	if !bkdOK {
		d.refuse(c, t, "bkd-mismatch", codec.CodeBadRequest)
		return
	}
	if !d.fresh(ctx, c, t, msg) {
		return
	}
	committed, err := d.reg.CommitChange(ctx, s.sn, msg.RID)
	if errors.Is(err, keysvc.ErrInactive) {
		d.refuse(c, t, "inactive", codec.CodeUnknownRID)
		return
	}
	if errors.Is(err, keysvc.ErrUnknownRID) {
		d.refuse(c, t, "unknown-rid", codec.CodeUnknownRID)
		return
	}
	if err != nil {
		d.failed(s.sn, msg.RID, "commit", err)
		return
	}
	d.committed(s.sn, msg.RID, "ack")
	d.sendDone(c, committed.Creds.Down, msg.RID)
	s.closeAfter.Store(true) // WMMP's logout reason 9: log in again with the new values
}

// sendDone confirms a commit, signed with the (new) downlink password.
func (d *changeDesk) sendDone(c termConn, down []byte, rid codec.ID) {
	d.link.sendKey(c, d.sign(c.s, down, codec.Control{Kind: codec.KindDone, RID: rid}))
}

// refuse answers a control message with an err. The
// MaxControlRefusals-th refusal of a session ends it: a terminal that
// keeps sending what the platform refuses is broken or hostile. t is nil
// when the message was refused before the record was read.
func (d *changeDesk) refuse(c termConn, t *keysvc.Terminal, reason string, code codec.ErrCode) {
	s := c.s
	d.changes.WithLabelValues("refused", reason).Inc()
	d.link.event(slog.LevelWarn, "control_refused", "sn", s.sn, "reason", reason)
	down := s.down
	if t != nil {
		down = t.Creds.Down
	}
	d.link.sendKey(c, d.sign(s, down, codec.Control{Kind: codec.KindErr, Code: code}))
	if int(s.ctlRefused.Add(1)) >= d.maxRefusals {
		d.link.endSession(c, "control-refusals", packets.ErrQuotaExceeded)
	}
}

// started records a change that started; attrs are added to its event.
func (d *changeDesk) started(sn string, ch *keysvc.Change, attrs ...any) {
	d.watch.watch(sn, ch.RID, ch.Deadline)
	d.book.Watch(sn, ch.RID, ch.Deadline)
	d.changes.WithLabelValues("started", ch.Origin).Inc()
	d.link.event(slog.LevelInfo, "change_started", append([]any{"sn", sn, "rid", ch.RID.String(), "what", string(ch.What),
		"mode", string(ch.Mode), "origin", ch.Origin, "deadline", ch.Deadline.UTC()}, attrs...)...)
	d.emit(events.ChangeStarted, sn, ch.RID, func(e *events.Event) {
		e.What, e.Mode, e.Origin = string(ch.What), string(ch.Mode), ch.Origin
	})
}

func (d *changeDesk) committed(sn string, rid codec.ID, by string) {
	d.watch.forget(sn)
	d.book.Forget(sn)
	d.changes.WithLabelValues("committed", by).Inc()
	d.link.event(slog.LevelInfo, "change_committed", "sn", sn, "rid", rid.String(), "by", by)
	d.emit(events.ChangeCommitted, sn, rid, func(e *events.Event) { e.Reason = by })
}

// emit hands a change event for applications to the link: kind, sn and
// rid, and what fill sets. Change events are rare: the closure costs
// nothing that matters.
func (d *changeDesk) emit(kind events.Kind, sn string, rid codec.ID, fill func(*events.Event)) {
	if d.link.emit == nil {
		return
	}
	e := events.New(kind, sn, d.now())
	e.RID = rid.String()
	if fill != nil {
		fill(&e)
	}
	d.link.emit(e)
}

func (d *changeDesk) failed(sn string, rid codec.ID, step string, err error, attrs ...any) {
	d.changes.WithLabelValues("failed", step).Inc()
	d.link.event(slog.LevelWarn, "change_failed", append([]any{"sn", sn, "rid", rid.String(), "step", step, "err", err.Error()}, attrs...)...)
}

// forget stops watching the change of sn (an operator revoked the
// terminal: the key service cancels the change).
func (d *changeDesk) forget(sn string) {
	d.watch.forget(sn)
	d.book.Forget(sn)
}

// sweep runs expireDue within one store timeout; the hook's housekeeping
// calls it every minute.
func (d *changeDesk) sweep() {
	ctx, cancel := d.storeCtx()
	defer cancel()
	d.expireDue(ctx)
}

// expireDue drops the watched changes past their deadline, keeping the
// old values, and records each expiry.
func (d *changeDesk) expireDue(ctx context.Context) {
	for _, c := range d.book.Due(d.now()) {
		dropped, err := d.reg.ExpireChange(ctx, c.SN)
		switch {
		case err != nil && !errors.Is(err, keysvc.ErrNotFound):
			d.failed(c.SN, c.RID, "expire", err)
		case dropped:
			d.changes.WithLabelValues("expired", "").Inc()
			d.link.event(slog.LevelInfo, "change_expired", "sn", c.SN, "rid", c.RID.String())
			d.emit(events.ChangeExpired, c.SN, c.RID, nil)
		}
	}
}

// changeWatch remembers the deadlines of the changes this node started, so
// that their expiry is recorded (the key service drops an expired change
// lazily and silently): the local ChangeBook's.
type changeWatch struct {
	mu        sync.Mutex
	deadlines map[string]watched // by sn
	shared    bool               // a fleet's book records the expiries: has drops passed deadlines
}

// watched is a change whose deadline is watched.
type watched struct {
	sn       string
	rid      codec.ID
	deadline time.Time
}

func (w *changeWatch) watch(sn string, rid codec.ID, deadline time.Time) {
	w.mu.Lock()
	w.deadlines[sn] = watched{sn, rid, deadline}
	w.mu.Unlock()
}

// has reports whether sn has a watched change whose deadline has not
// passed at now; one past it is dropped (with a fleet's book, another
// broker may be the one that records its expiry).
func (w *changeWatch) has(sn string, now time.Time) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	c, ok := w.deadlines[sn]
	if ok && !now.Before(c.deadline) && w.shared {
		delete(w.deadlines, sn)
		return false
	}
	return ok
}

func (w *changeWatch) forget(sn string) {
	w.mu.Lock()
	delete(w.deadlines, sn)
	w.mu.Unlock()
}

func (w *changeWatch) due(now time.Time) []DueChange {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []DueChange
	for sn, c := range w.deadlines {
		if !now.Before(c.deadline) {
			out = append(out, DueChange{SN: c.sn, RID: c.rid})
			delete(w.deadlines, sn)
		}
	}
	return out
}

func sameSecret(a, b []byte) bool { return subtle.ConstantTimeCompare(a, b) == 1 }

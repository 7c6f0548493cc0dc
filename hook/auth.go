package hook

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Refusal reasons, as they appear in logs and in the reason label of
// m2mguard_logins_total.
const (
	reasonMalformed   = "malformed"
	reasonUnknown     = "unknown-terminal"
	reasonBinding     = "binding-mismatch"
	reasonAlg         = "alg-mismatch"
	reasonSkew        = "skew"
	reasonReplay      = "replay"
	reasonDigest      = "bad-digest"
	reasonThrottled   = "throttled"
	reasonExpired     = "expired"
	reasonDisabled    = "disabled"
	reasonUnavailable = "store-unavailable"
	reasonGuardDown   = "replay-guard-unavailable"
	reasonBadApp      = "bad-application-credentials"
	reasonAnonymous   = "anonymous"
	reasonForeignID   = "foreign-client-id"
)

// dummyUp is verified against when the terminal is unknown, so that an
// unknown sn costs the same work as a known one.
var dummyUp = []byte("m2mguard-dummy-password")

// authenticate runs the checks of SPEC section 3 and returns the new
// session, or nil and the CONNACK code of the refusal.
func (h *Hook) authenticate(cl *mqtt.Client, pk packets.Packet) (*session, packets.Code) {
	clientID := pk.Connect.ClientIdentifier
	addr := remoteHost(cl.Net.Remote)
	// ClientIDs that are valid serial numbers belong to terminals: nobody
	// else can take over a terminal's session (mochi lets a new connection
	// take over any ClientID). A terminal's username (IMEI:IMSI, at most 32
	// bytes) does not outlive authTerminal: its string is on the stack.
	if codec.ValidateSN(clientID) == nil {
		return h.authTerminal(cl, clientID, string(pk.Connect.Username), pk.Connect.Password, addr)
	}
	username := string(pk.Connect.Username)
	if !pk.Connect.UsernameFlag || username == "" {
		h.refused("", addr, reasonAnonymous, slog.String("client_id", clientID))
		return nil, packets.ErrBadUsernameOrPassword
	}
	if !keysvc.AppOwnsClientID(username, clientID) {
		return h.refuseForeignClientID(username, clientID, addr)
	}
	return h.authApp(cl, username, pk.Connect.Password, addr)
}

// refuseForeignClientID refuses an application whose ClientID is not its
// own (keysvc.AppOwnsClientID): with it, the application could kick
// another application's live session, or resume its persistent one and
// receive what was queued there. The answer is that of a wrong password;
// the refusal is decided on the two names alone, before any password
// work, so it tells nothing about the application or its password.
func (h *Hook) refuseForeignClientID(app, clientID, addr string) (*session, packets.Code) {
	h.refused("", addr, reasonForeignID, slog.String("app", clip(app)), slog.String("client_id", clip(clientID)))
	return nil, packets.ErrBadUsernameOrPassword
}

// clip bounds a client-chosen name for the log.
func clip(s string) string {
	const limit = 64
	if len(s) > limit {
		return s[:limit] + "..."
	}
	return s
}

func remoteHost(remote string) string {
	if host, _, err := net.SplitHostPort(remote); err == nil {
		return host
	}
	return remote
}

// refused records a refusal: a security event and the metric.
func (h *Hook) refused(sn, addr, reason string, attrs ...slog.Attr) {
	h.metrics.refusedFor(reason).Inc()
	all := make([]slog.Attr, 0, 5) // on the stack for up to two attrs
	all = append(all, slog.String("sn", sn), slog.String("remote", addr), slog.String("reason", reason))
	h.eventAttrs(slog.LevelWarn, "login_refused", append(all, attrs...)...)
}

func (h *Hook) authTerminal(cl *mqtt.Client, sn, username string, password []byte, addr string) (*session, packets.Code) {
	now := h.opts.Now()
	revokeSeq := h.revoked.current() // before the record is read: see OnConnect
	known := false                   // the record was found: refusals are events for applications too
	fail := func(reason string, code packets.Code, attrs ...slog.Attr) (*session, packets.Code) {
		if known {
			h.refusedKnown(sn, addr, reason, attrs...)
		} else {
			h.refused(sn, addr, reason, attrs...)
		}
		if d := h.throttle.Fail(sn, addr, now); d > 0 {
			time.Sleep(d)
		}
		return nil, code
	}

	// 1. Every field parses.
	l, err := codec.ParseLogin(sn, username, password)
	if err != nil {
		field := ""
		var cerr *codec.Error
		if errors.As(err, &cerr) {
			field = cerr.Field
		}
		return fail(reasonMalformed, packets.ErrBadUsernameOrPassword, slog.String("field", field))
	}
	// 8 (checked before the digest, so that the answer to a throttled
	// address never says whether its guess was right).
	if h.throttle.Blocked(sn, addr, now) {
		h.metrics.throttled.Inc()
		h.refused(sn, addr, reasonThrottled)
		return nil, packets.ErrBanned
	}
	// 2. The terminal exists.
	dl := new(loginDeadlines)
	ctx := &dl.store
	ctx.start(context.Background(), h.opts.StoreTimeout)
	defer ctx.release()
	start := time.Now()
	t, err := h.reg.Lookup(ctx, sn)
	h.metrics.lookupLatency.Observe(time.Since(start).Seconds())
	switch {
	case errors.Is(err, keysvc.ErrNotFound):
		l.Verify(dummyUp) // same work as for a known terminal
		return fail(reasonUnknown, packets.ErrBadUsernameOrPassword)
	case err != nil:
		h.refused(sn, addr, reasonUnavailable, slog.String("err", err.Error()))
		return nil, packets.ErrServerUnavailable
	}
	known = true
	// 3. The binding sn ↔ IMEI ↔ IMSI.
	imeiChanged, imsiChanged := l.IMEI != t.IMEI, l.IMSI != t.IMSI
	if imeiChanged || imsiChanged {
		changed := "imsi" // SIM moved to another device
		switch {
		case imeiChanged && imsiChanged:
			changed = "imei+imsi"
		case imeiChanged:
			changed = "imei" // device swapped
		}
		h.metrics.binding.WithLabelValues(changed).Inc()
		h.event(slog.LevelWarn, "binding_mismatch", "sn", sn, "remote", addr, "changed", changed)
		e := h.sink.event(events.BindingMismatch, sn)
		e.Reason = changed
		h.sink.emit(e)
		l.Verify(dummyUp)
		return fail(reasonBinding, packets.ErrBadUsernameOrPassword, slog.String("changed", changed))
	}
	// 4. No downgrade.
	if l.Alg != t.Alg {
		return fail(reasonAlg, packets.ErrBadUsernameOrPassword, slog.String("alg", l.Alg.String()))
	}
	// 5. Clock skew.
	if d := now.Sub(time.Unix(int64(l.TS), 0)); d > h.opts.Skew || d < -h.opts.Skew {
		return fail(reasonSkew, packets.ErrBadUsernameOrPassword)
	}
	// 7. The digest, with up or with the pending new up (which commits).
	match := t.MatchUplink(l.Verify)
	if match == keysvc.MatchNone {
		return fail(reasonDigest, packets.ErrBadUsernameOrPassword)
	}
	// 6. The nonce is claimed once, atomically: after the digest (so that
	// only genuine logins fill the guard), before any side effect.
	switch first, err := h.claimWithin(&dl.claim, sn, l.TS, l.Nonce, now); {
	case err != nil:
		h.refusedKnown(sn, addr, reasonGuardDown, slog.String("err", err.Error()))
		return nil, packets.ErrServerUnavailable
	case !first:
		h.metrics.replays.WithLabelValues("login").Inc()
		return fail(reasonReplay, packets.ErrBadUsernameOrPassword)
	}
	if match == keysvc.MatchPending {
		rid := t.Pending.RID
		committed, err := h.reg.CommitChange(ctx, sn, rid)
		switch {
		case errors.Is(err, keysvc.ErrInactive): // disabled since the record was cached
			h.refusedKnown(sn, addr, reasonDisabled)
			return nil, packets.ErrNotAuthorized
		case err != nil:
			h.refusedKnown(sn, addr, reasonUnavailable, slog.String("err", err.Error()))
			return nil, packets.ErrServerUnavailable
		}
		h.changes.committed(sn, rid, "login")
		t = committed
	}
	h.throttle.Succeed(sn, addr)
	// 9. Expiry of up, with the grace period.
	if t.Creds.UpExp != codec.Never && now.After(time.Unix(int64(t.Creds.UpExp), 0).Add(h.opts.Grace)) {
		return fail(reasonExpired, packets.ErrBadUsernameOrPassword)
	}
	// 10. Active.
	if t.Status != keysvc.StatusActive {
		h.refusedKnown(sn, addr, reasonDisabled)
		return nil, packets.ErrNotAuthorized
	}

	s := newTerminalSession(t)
	s.revokeSeq = revokeSeq
	if l.WantsSessionKey() {
		h.issueKey(ctx, s, t, l.BKD, now)
	}
	s.loginRecord, s.loginPending = t, t.Pending
	if t.Pending == nil {
		s.loginPending = h.changes.renew(s, t, now)
	}
	h.restrictTerminal(cl, s)
	h.metrics.accepted.Inc()
	protocol := slog.Uint64("protocol", uint64(cl.Properties.ProtocolVersion))
	if s.hasKey() {
		h.eventAttrs(slog.LevelInfo, "login_accepted", slog.String("sn", sn), slog.String("remote", addr),
			slog.String("alg", t.Alg.String()), slog.Bool("session_key", true), slog.String("sid", s.sid.String()),
			slog.Int64("key_exp", s.exp.Unix()), protocol)
	} else {
		h.eventAttrs(slog.LevelInfo, "login_accepted", slog.String("sn", sn), slog.String("remote", addr),
			slog.String("alg", t.Alg.String()), slog.Bool("session_key", false), protocol)
	}
	return s, packets.CodeSuccess
}

// issueKey prepares the key-topic message of a login with flag 01: a
// session key wrapped under bk if bkd matches and bk is valid, else err
// bk-mismatch or bk-expired (SPEC section 5). ctx is the login's.
func (h *Hook) issueKey(ctx context.Context, s *session, t *keysvc.Terminal, bkd string, now time.Time) {
	T := uint32(now.Unix())
	msg := codec.Control{Alg: t.Alg, TS: T}
	bkValid := t.Creds.BKExp == codec.Never || now.Before(time.Unix(int64(t.Creds.BKExp), 0))
	switch {
	case !codec.BasicKeyDigestEqual(bkd, t.Alg, t.Creds.BK, t.Creds.BKExp):
		msg.Kind, msg.Code = codec.KindErr, codec.CodeBKMismatch
	case !bkValid:
		msg.Kind, msg.Code = codec.KindErr, codec.CodeBKExpired
	default:
		s.bkSync = true
		if err := h.newSessionKey(ctx, s, t, &msg, now); err != nil {
			h.event(slog.LevelWarn, "session_key_failed", "sn", s.sn, "err", err.Error())
			return
		}
	}
	payload, err := msg.Sign(s.id, t.Creds.Down)
	if err != nil {
		h.event(slog.LevelError, "key_message_failed", "sn", s.sn, "err", err.Error())
		return
	}
	s.keyq = append(s.keyqFirst[:0], payload) // sent once the key topic is subscribed
	if msg.Kind == codec.KindErr {
		h.event(slog.LevelWarn, "basic_key_refused", "sn", s.sn, "code", string(msg.Code))
	}
}

// newSessionKey draws a session key, keeps it in the session (its AEAD is
// built on the first envelope) and fills msg with the key wrapped under bk.
// The login_accepted event carries its sid.
func (h *Hook) newSessionKey(ctx context.Context, s *session, t *keysvc.Terminal, msg *codec.Control, now time.Time) error {
	ks, err := h.reg.NewSessionKey(ctx, s.sn)
	if err != nil {
		return err
	}
	var sid [8]byte
	if _, err := h.opts.Rand.Read(sid[:]); err != nil {
		clear(ks)
		return err
	}
	s.sid = codec.ID(uint64(sid[0])<<56 | uint64(sid[1])<<48 | uint64(sid[2])<<40 | uint64(sid[3])<<32 |
		uint64(sid[4])<<24 | uint64(sid[5])<<16 | uint64(sid[6])<<8 | uint64(sid[7]))
	wrapped, err := codec.WrapSessionKey(t.Creds.BK, s.sn, s.sid, ks, h.opts.Rand)
	if err != nil {
		clear(ks)
		return err
	}
	s.key = ks // fresh from the registry, now the session's; WrapSessionKey checked its length: aead() cannot fail
	s.exp = now.Add(h.opts.SessionLifetime)
	msg.Kind, msg.Exp, msg.SID, msg.Wrapped = codec.KindSK, uint32(s.exp.Unix()), s.sid, wrapped
	h.metrics.keysIssued.Inc()
	return nil
}

// restrictTerminal applies the per-connection rules of a terminal: no
// outbound topic aliases (downlink envelopes need the topic name for their
// AAD), and no will message outside what the terminal may publish.
func (h *Hook) restrictTerminal(cl *mqtt.Client, s *session) {
	cl.Properties.Props.TopicAliasMaximum = 0
	if cl.Properties.Will.Flag != 0 && !s.willAllowed(cl.Properties.Will.TopicName) {
		h.event(slog.LevelWarn, "will_refused", "sn", s.sn)
		cl.Properties.Will = mqtt.Will{}
	}
}

func (h *Hook) authApp(cl *mqtt.Client, name string, password []byte, addr string) (*session, packets.Code) {
	now := h.opts.Now()
	id := "app:" + name
	if h.throttle.Blocked(id, addr, now) {
		h.metrics.throttled.Inc()
		h.refused("", addr, reasonThrottled, slog.String("app", clip(name)))
		return nil, packets.ErrBanned
	}
	// The budgets of the argon2id verification, decided before the name is
	// looked up: the answer never depends on whether it exists.
	slot, limit := h.apps.admit(addr, now)
	switch limit {
	case limitNone:
	case limitFailuresPerAddr:
		h.metrics.throttled.Inc()
		h.refused("", addr, reasonThrottled, slog.String("app", clip(name)), slog.String("limit", string(limit)))
		return nil, packets.ErrBanned
	default:
		h.refused("", addr, reasonBusy, slog.String("app", clip(name)), slog.String("limit", string(limit)))
		return nil, packets.ErrServerBusy
	}
	ctx, cancel := h.ctx()
	defer cancel()
	app, err := h.verifyApp(ctx, slot, name, password)
	if err != nil {
		if errors.Is(err, keysvc.ErrUnavailable) {
			h.refused("", addr, reasonUnavailable, slog.String("app", clip(name)), slog.String("err", err.Error()))
			return nil, packets.ErrServerUnavailable
		}
		h.refused("", addr, reasonBadApp, slog.String("app", clip(name)))
		if d := h.throttle.Fail(id, addr, now); d > 0 {
			time.Sleep(d)
		}
		return nil, packets.ErrBadUsernameOrPassword
	}
	h.throttle.Succeed(id, addr)
	s := &session{kind: kindApp, app: app}
	if cl.Properties.Will.Flag != 0 && !s.willAllowed(cl.Properties.Will.TopicName) {
		h.event(slog.LevelWarn, "will_refused", "app", name)
		cl.Properties.Will = mqtt.Will{}
	}
	h.metrics.accepted.Inc()
	h.event(slog.LevelInfo, "login_accepted", "app", name, "remote", addr, "protocol", cl.Properties.ProtocolVersion)
	return s, packets.CodeSuccess
}

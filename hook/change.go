package hook

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Credential changes (SPEC section 7, patent Embodiment 5). The key
// service holds the state machine (start, commit, expire; atomic and
// idempotent); the hook decides the mode, delivers the new values (cfg in
// ciphertext, or acc plus an SMS), verifies the ack and closes the
// connection after done, so that the terminal logs in with the new values.

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
	t, err := h.reg.Get(ctx, sn)
	if err != nil {
		return nil, err
	}
	if t.Status != keysvc.StatusActive {
		return nil, fmt.Errorf("hook: start change %s: %w", sn, keysvc.ErrInactive)
	}
	cl, s := h.online(sn)
	mode, ok := h.chooseMode(s, t, codec.ModeCipher)
	if !ok {
		mode = codec.ModeCipher // recorded as wanted; decided again at delivery
	}
	ch, err := h.reg.StartChange(ctx, sn, keysvc.ChangeRequest{What: what, Mode: mode, Origin: keysvc.OriginOperator})
	if err != nil {
		return nil, err
	}
	h.changeStarted(sn, ch)
	if s != nil && ok && h.deliver(cl, s, t, ch, mode) {
		ch.Delivered = true // the caller sees what the store now holds
	}
	return ch, nil
}

// online returns the connection and session of terminal sn, if connected.
func (h *Hook) online(sn string) (*mqtt.Client, *session) {
	cl, ok := h.server.Clients.Get(sn)
	if !ok || cl.Closed() {
		return nil, nil
	}
	s := h.session(cl)
	if s == nil || s.kind != kindTerminal {
		return nil, nil
	}
	return cl, s
}

// chooseMode applies SPEC section 7: ciphertext only while the basic key
// is in sync and valid (its bkd matched at this login, so s.bkSync), SMS
// only with an MSISDN and a gateway. Ciphertext wins whenever it is
// possible: an SMS carries the new values in plaintext, so it is the
// recovery channel for a terminal whose basic key is lost or expired. A
// terminal's request for SMS (preferred) is honoured over ciphertext only
// under the operator policy Options.SMSOnRequest.
func (h *Hook) chooseMode(s *session, t *keysvc.Terminal, preferred codec.Mode) (codec.Mode, bool) {
	cipherOK := s != nil && s.bkSync &&
		(t.Creds.BKExp == codec.Never || h.opts.Now().Before(time.Unix(int64(t.Creds.BKExp), 0)))
	smsOK := t.MSISDN != "" && h.opts.SMS != nil
	switch {
	case preferred == codec.ModeSMS && smsOK && h.opts.SMSOnRequest:
		return codec.ModeSMS, true
	case cipherOK:
		return codec.ModeCipher, true
	case smsOK:
		return codec.ModeSMS, true
	}
	return "", false
}

// startRenewal starts a change for a credential of t that expires within
// RenewBefore (or expired, inside the grace period) at a login.
func (h *Hook) startRenewal(s *session, t *keysvc.Terminal, now time.Time) *keysvc.Change {
	due := func(exp uint32) bool {
		return exp != codec.Never && now.Add(h.opts.RenewBefore).After(time.Unix(int64(exp), 0))
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
	mode, ok := h.chooseMode(s, t, codec.ModeCipher)
	if !ok {
		mode = codec.ModeCipher
	}
	ctx, cancel := h.ctx()
	defer cancel()
	ch, err := h.reg.StartChange(ctx, t.SN, keysvc.ChangeRequest{What: what, Mode: mode, Origin: keysvc.OriginExpiry})
	switch {
	case err == nil:
		h.changeStarted(t.SN, ch) // delivered by deliverPending once the session is established
		return ch
	case errors.Is(err, keysvc.ErrBusy):
	default:
		h.changeFailed(t.SN, 0, "start", err)
	}
	return nil
}

// deliverPending sends, after a login, the change that waits for the
// terminal: one started while it was offline, one whose cfg may have been
// lost, or the renewal this login started. The login left the record and
// the change in the session; they are used once and dropped.
func (h *Hook) deliverPending(cl *mqtt.Client, s *session) {
	t, ch := s.loginRecord, s.loginPending
	s.loginRecord, s.loginPending = nil, nil
	if ch == nil {
		return
	}
	if ch.Delivered && ch.Mode == codec.ModeSMS {
		// The SMS went out already: say again that it did, do not send it again.
		h.sendKey(cl, s, h.signDown(s, t, codec.Control{Kind: codec.KindAcc, RID: ch.RID}))
		return
	}
	mode, ok := h.chooseMode(s, t, ch.Mode)
	if !ok {
		h.event(slog.LevelInfo, "change_waiting", "sn", s.sn, "rid", ch.RID.String(), "reason", "no channel at this login")
		return
	}
	h.deliver(cl, s, t, ch, mode)
}

// deliver sends the new values of ch to the online terminal by mode. It
// reports whether they were delivered already (a cfg); an SMS goes out in
// the background and is recorded when the gateway takes it.
func (h *Hook) deliver(cl *mqtt.Client, s *session, t *keysvc.Terminal, ch *keysvc.Change, mode codec.Mode) bool {
	params := changeParams(ch)
	if mode == codec.ModeCipher {
		wrapped, err := codec.WrapParams(t.Creds.BK, s.sn, ch.RID, params, h.opts.Rand)
		if err != nil {
			h.changeFailed(s.sn, ch.RID, "wrap", err)
			return false
		}
		h.sendKey(cl, s, h.signDown(s, t, codec.Control{Kind: codec.KindCfg, RID: ch.RID, Wrapped: wrapped}))
		return h.markDelivered(s.sn, ch.RID, mode)
	}
	h.sendKey(cl, s, h.signDown(s, t, codec.Control{Kind: codec.KindAcc, RID: ch.RID}))
	msg := codec.SMS{SN: s.sn, RID: ch.RID, Params: params}
	text, err := msg.Encode()
	if err != nil {
		h.changeFailed(s.sn, ch.RID, "sms-encode", err)
		return false
	}
	h.spawn(func() { h.sendSMS(t.SN, t.MSISDN, ch.RID, ch.Deadline, string(text)) })
	return false
}

// sendSMS hands the text to the gateway, retrying with back-off while the
// change is pending and before its deadline, until the hook stops. The
// text is a secret: it is never logged.
func (h *Hook) sendSMS(sn, msisdn string, rid codec.ID, deadline time.Time, text string) {
	wait := h.opts.SMSRetry
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(h.life, 30*time.Second)
		err := h.opts.SMS.Send(ctx, msisdn, text)
		cancel()
		if err == nil {
			h.markDelivered(sn, rid, codec.ModeSMS)
			return
		}
		h.changeFailed(sn, rid, "sms-send", err, "attempt", attempt)
		if !h.opts.Now().Add(wait).Before(deadline) {
			return // the change expires; the old values stay
		}
		select {
		case <-h.life.Done():
			return
		case <-time.After(wait):
		}
		if !h.stillPending(sn, rid) {
			return
		}
		wait = min(2*wait, 5*time.Minute)
	}
}

func (h *Hook) stillPending(sn string, rid codec.ID) bool {
	ctx, cancel := h.ctx()
	defer cancel()
	t, err := h.reg.Get(ctx, sn)
	return err == nil && t.Status == keysvc.StatusActive && t.Pending != nil && t.Pending.RID == rid
}

func (h *Hook) markDelivered(sn string, rid codec.ID, mode codec.Mode) bool {
	ctx, cancel := h.ctx()
	defer cancel()
	if _, err := h.reg.MarkDelivered(ctx, sn, rid, mode); err != nil {
		h.changeFailed(sn, rid, "mark-delivered", err)
		return false
	}
	h.metrics.changes.WithLabelValues("delivered", string(mode)).Inc()
	h.event(slog.LevelInfo, "change_delivered", "sn", sn, "rid", rid.String(), "mode", string(mode))
	return true
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

// signDown completes and signs a platform message with the current
// downlink password of t.
func (h *Hook) signDown(s *session, t *keysvc.Terminal, c codec.Control) []byte {
	return h.signWith(s, t.Creds.Down, c)
}

func (h *Hook) signWith(s *session, down []byte, c codec.Control) []byte {
	c.Alg, c.TS = s.alg, uint32(h.opts.Now().Unix())
	payload, err := c.Sign(s.id, down)
	if err != nil { // only a bug in this package gets here
		h.event(slog.LevelError, "sign_failed", "sn", s.sn, "kind", string(c.Kind), "err", err.Error())
		return nil
	}
	return payload
}

// onControl handles a terminal's control message on $m2m/<sn>/ctl. Control
// messages are for the platform only: they are acknowledged and never
// delivered.
func (h *Hook) onControl(cl *mqtt.Client, s *session, pk packets.Packet) (packets.Packet, error) {
	if s.ending.Load() {
		return pk, packets.CodeSuccessIgnore // the session is being closed: no answer, no event
	}
	c, err := codec.ParseControl(pk.Payload)
	if err != nil || !c.Kind.Uplink() {
		h.controlRefused(cl, s, nil, "bad-request", codec.CodeBadRequest)
		return pk, packets.CodeSuccessIgnore
	}
	ctx, cancel := h.ctx()
	defer cancel()
	t, err := h.reg.Get(ctx, s.sn)
	if err != nil {
		h.changeFailed(s.sn, 0, "lookup", err)
		return pk, packets.CodeSuccessIgnore
	}
	if t.Status != keysvc.StatusActive {
		// Disabled while connected: Revoke is on its way (or the record
		// was changed in the store directly). Nothing is acted on.
		h.event(slog.LevelWarn, "control_refused", "sn", s.sn, "reason", "inactive")
		h.Revoke(s.sn, RevokeDisabled)
		return pk, packets.CodeSuccessIgnore
	}
	if c.Alg != t.Alg {
		h.controlRefused(cl, s, t, "alg-mismatch", codec.CodeBadRequest)
		return pk, packets.CodeSuccessIgnore
	}
	if c.Kind == codec.KindChg {
		h.onChg(ctx, cl, s, t, &c)
	} else {
		h.onAck(ctx, cl, s, t, &c)
	}
	return pk, packets.CodeSuccessIgnore
}

// fresh checks the time of an uplink control message whose digest has
// verified and claims its nonce, as for a login; it answers the error
// itself and reports false. A message whose claim fails is not acted on.
func (h *Hook) fresh(ctx context.Context, cl *mqtt.Client, s *session, t *keysvc.Terminal, c *codec.Control) bool {
	now := h.opts.Now()
	if d := now.Sub(time.Unix(int64(c.TS), 0)); d > h.opts.Skew || d < -h.opts.Skew {
		h.controlRefused(cl, s, t, "skew", codec.CodeSkew)
		return false
	}
	switch first, err := h.claim(ctx, s.sn, c.TS, c.Nonce, now); {
	case err != nil:
		h.changeFailed(s.sn, c.RID, "replay-guard", err, "kind", string(c.Kind))
		return false
	case !first:
		h.metrics.replays.WithLabelValues("control").Inc()
		h.controlRefused(cl, s, t, "replay", codec.CodeReplay)
		return false
	}
	return true
}

func (h *Hook) onChg(ctx context.Context, cl *mqtt.Client, s *session, t *keysvc.Terminal, c *codec.Control) {
	if !c.Verify(s.id, t.Creds.Up) {
		h.controlRefused(cl, s, t, "bad-digest", codec.CodeBadRequest)
		return
	}
	if !h.fresh(ctx, cl, s, t, c) {
		return
	}
	if t.Pending != nil && !t.Pending.Expired(h.opts.Now()) {
		h.controlRefused(cl, s, t, "busy", codec.CodeBusy)
		return
	}
	mode, ok := h.chooseMode(s, t, c.Mode)
	if !ok {
		h.controlRefused(cl, s, t, "no-channel", codec.CodeNoChannel)
		return
	}
	ch, err := h.reg.StartChange(ctx, s.sn, keysvc.ChangeRequest{What: c.What, Mode: mode, Origin: keysvc.OriginTerminal})
	switch {
	case errors.Is(err, keysvc.ErrBusy):
		h.controlRefused(cl, s, t, "busy", codec.CodeBusy)
		return
	case err != nil:
		h.changeFailed(s.sn, 0, "start", err)
		return
	}
	h.changeStarted(s.sn, ch)
	h.deliver(cl, s, t, ch, mode)
}

func (h *Hook) onAck(ctx context.Context, cl *mqtt.Client, s *session, t *keysvc.Terminal, c *codec.Control) {
	if t.Pending == nil || t.Pending.RID != c.RID {
		if c.RID != 0 && t.LastCommitted == c.RID && c.Verify(s.id, t.Creds.Up) {
			// Committed already (a login with the new values did it):
			// confirm again; close only a session still on old values.
			// A stale or replayed ack gets only fresh's answer.
			if !h.fresh(ctx, cl, s, t, c) {
				return
			}
			h.sendDone(cl, s, t.Creds.Down, c.RID)
			if !sameSecret(s.down, t.Creds.Down) {
				s.closeAfter.Store(true)
			}
			return
		}
		h.controlRefused(cl, s, t, "unknown-rid", codec.CodeUnknownRID)
		return
	}
	p := t.Pending
	// The ack is digested with the new uplink password and carries the bkd
	// of the new basic key (empty if bk does not change).
	if !c.Verify(s.id, p.New.Up) {
		h.controlRefused(cl, s, t, "bad-digest", codec.CodeBadRequest)
		return
	}
	bkdOK := c.BKD == ""
	if p.What.BasicKey() {
		bkdOK = codec.BasicKeyDigestEqual(c.BKD, t.Alg, p.New.BK, p.New.BKExp)
	}
	if !bkdOK {
		h.controlRefused(cl, s, t, "bkd-mismatch", codec.CodeBadRequest)
		return
	}
	if !h.fresh(ctx, cl, s, t, c) {
		return
	}
	committed, err := h.reg.CommitChange(ctx, s.sn, c.RID)
	if errors.Is(err, keysvc.ErrInactive) {
		h.controlRefused(cl, s, t, "inactive", codec.CodeUnknownRID)
		return
	}
	if errors.Is(err, keysvc.ErrUnknownRID) {
		h.controlRefused(cl, s, t, "unknown-rid", codec.CodeUnknownRID)
		return
	}
	if err != nil {
		h.changeFailed(s.sn, c.RID, "commit", err)
		return
	}
	h.changeCommitted(s.sn, c.RID, "ack")
	h.sendDone(cl, s, committed.Creds.Down, c.RID)
	s.closeAfter.Store(true) // WMMP's logout reason 9: log in again with the new values
}

// sendDone confirms a commit, signed with the (new) downlink password.
func (h *Hook) sendDone(cl *mqtt.Client, s *session, down []byte, rid codec.ID) {
	h.sendKey(cl, s, h.signWith(s, down, codec.Control{Kind: codec.KindDone, RID: rid}))
}

// OnPublished ends the connection after a committed change, once mochi has
// acknowledged the ack message and the done is written.
func (h *Hook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if s := h.session(cl); s != nil && s.kind == kindTerminal && s.closeAfter.Swap(false) {
		h.endSessionAfterKeys(cl, s, "credentials-changed", packets.CodeDisconnect)
	}
}

// controlRefused answers a control message with an err. The
// MaxControlRefusals-th refusal of a session ends it: a terminal that
// keeps sending what the platform refuses is broken or hostile.
func (h *Hook) controlRefused(cl *mqtt.Client, s *session, t *keysvc.Terminal, reason string, code codec.ErrCode) {
	h.metrics.changes.WithLabelValues("refused", reason).Inc()
	h.event(slog.LevelWarn, "control_refused", "sn", s.sn, "reason", reason)
	down := s.down
	if t != nil {
		down = t.Creds.Down
	}
	h.sendKey(cl, s, h.signWith(s, down, codec.Control{Kind: codec.KindErr, Code: code}))
	if int(s.ctlRefused.Add(1)) >= h.opts.MaxControlRefusals {
		h.endSession(cl, s, "control-refusals", packets.ErrQuotaExceeded)
	}
}

func (h *Hook) changeStarted(sn string, ch *keysvc.Change) {
	h.changes.watch(sn, ch.Deadline)
	h.metrics.changes.WithLabelValues("started", ch.Origin).Inc()
	h.event(slog.LevelInfo, "change_started", "sn", sn, "rid", ch.RID.String(), "what", string(ch.What),
		"mode", string(ch.Mode), "origin", ch.Origin, "deadline", ch.Deadline.UTC())
}

func (h *Hook) changeCommitted(sn string, rid codec.ID, by string) {
	h.changes.forget(sn)
	h.metrics.changes.WithLabelValues("committed", by).Inc()
	h.event(slog.LevelInfo, "change_committed", "sn", sn, "rid", rid.String(), "by", by)
}

func (h *Hook) changeFailed(sn string, rid codec.ID, step string, err error, attrs ...any) {
	h.metrics.changes.WithLabelValues("failed", step).Inc()
	h.event(slog.LevelWarn, "change_failed", append([]any{"sn", sn, "rid", rid.String(), "step", step, "err", err.Error()}, attrs...)...)
}

// changeWatch remembers the deadlines of the changes this node started, so
// that their expiry is recorded (the key service drops an expired change
// lazily and silently).
type changeWatch struct {
	mu        sync.Mutex
	deadlines map[string]time.Time
}

func (w *changeWatch) watch(sn string, deadline time.Time) {
	w.mu.Lock()
	w.deadlines[sn] = deadline
	w.mu.Unlock()
}

func (w *changeWatch) forget(sn string) {
	w.mu.Lock()
	delete(w.deadlines, sn)
	w.mu.Unlock()
}

func (w *changeWatch) due(now time.Time) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for sn, d := range w.deadlines {
		if !now.Before(d) {
			out = append(out, sn)
			delete(w.deadlines, sn)
		}
	}
	return out
}

// ExpireChanges drops the watched changes past their deadline, keeping the
// old values, and records each expiry. The hook calls it every minute
// between Init and Stop; tests call it directly.
func (h *Hook) ExpireChanges(ctx context.Context) {
	for _, sn := range h.changes.due(h.opts.Now()) {
		dropped, err := h.reg.ExpireChange(ctx, sn)
		switch {
		case err != nil && !errors.Is(err, keysvc.ErrNotFound):
			h.changeFailed(sn, 0, "expire", err)
		case dropped:
			h.metrics.changes.WithLabelValues("expired", "").Inc()
			h.event(slog.LevelInfo, "change_expired", "sn", sn)
		}
	}
}

func sameSecret(a, b []byte) bool { return subtle.ConstantTimeCompare(a, b) == 1 }

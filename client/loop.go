package client

import (
	"context"
	"errors"
	"fmt"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/m2mguard/m2mguard/codec"
)

// loop handles, one at a time, everything that arrives: messages, accepted
// logins, key timeouts and SMS texts. It is the only goroutine that acts
// on control messages, so changes are applied in order.
func (c *Client) loop() {
	defer c.loopWG.Done()
	for {
		select {
		case it := <-c.in:
			c.handle(*it)
		case <-c.ctx.Done():
			return
		}
	}
}

func (c *Client) handle(it item) {
	switch it.kind {
	case itemLoggedIn:
		c.handleLoggedIn(it.sess)
	case itemConnected:
		c.handleConnected(it.sess)
	case itemKeyTimeout:
		s := it.sess
		s.mu.Lock()
		settled := s.ready || s.ended
		s.mu.Unlock()
		if !settled {
			c.cfg.Logger.Warn("m2m: no answer to the session key request", "sn", c.id.SN)
			c.emit(Event{Kind: EventNoSessionKey, Reason: "no sk or err within the key timeout"})
			c.settle(s)
		}
	case itemMessage:
		c.handleMessage(it)
	case itemSMS:
		c.handleSMS(it)
	case itemFunc:
		it.fn()
	}
}

// handleLoggedIn reports an accepted login, once: when paho reports it
// (before the client subscribes), or at the session's first message if
// that comes first (a persistent session's subscriptions deliver at once
// after the CONNACK, while paho calls its connect handler on a goroutine of
// its own).
func (c *Client) handleLoggedIn(s *session) {
	if s.announced {
		return
	}
	s.mu.Lock()
	ended := s.ended
	s.mu.Unlock()
	if ended {
		return
	}
	s.announced = true
	c.mu.Lock()
	reconnect := c.connectedOnce
	c.connectedOnce = true
	c.mu.Unlock()
	c.cfg.Logger.Info("m2m: connected", "sn", c.id.SN, "session_key_requested", s.wantKey, "pending", s.usedPending)
	c.emit(Event{Kind: EventConnected, Reconnect: reconnect, UsedPending: s.usedPending})
	if s.usedPending {
		// The platform accepted the pending new up: that login committed
		// the change (or it was committed already and its done was lost).
		c.commitPending(s.pendingRID, "login with the new password accepted")
	} else {
		c.mu.Lock()
		c.preferCurrent = false
		c.mu.Unlock()
	}
}

// handleConnected completes a login once the client has subscribed.
func (c *Client) handleConnected(s *session) {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return
	}
	s.connected = true
	s.mu.Unlock()
	c.notify()
	s.mu.Lock()
	ready := s.ready
	s.mu.Unlock()
	if ready {
		// The key message overtook the subscription's acknowledgement.
		c.resumeChange(s)
		return
	}
	if !s.wantKey {
		c.settle(s)
		return
	}
	t := time.AfterFunc(c.cfg.KeyTimeout, func() { c.enqueue(item{kind: itemKeyTimeout, sess: s}) })
	s.keyTimerStop = t.Stop
}

// settle marks the key question of s answered: held downlink data is
// delivered and a pending change is (re)acknowledged.
func (c *Client) settle(s *session) {
	s.mu.Lock()
	if s.ready {
		s.mu.Unlock()
		return
	}
	s.ready = true
	connected := s.connected && !s.ended
	s.mu.Unlock()
	// (If not connected yet, handleConnected resumes the change.)
	if s.keyTimerStop != nil {
		s.keyTimerStop()
	}
	c.notify()
	held := s.held
	s.held = nil
	for _, it := range held {
		c.handleData(it)
	}
	if connected {
		c.resumeChange(s)
	}
}

// resumeChange sends the ack of a change stored as pending but not known to
// be committed, once per session. This recovers a lost ack, a kill between
// cfg and ack, and a lost done (the platform then commits, or answers
// unknown-rid).
func (c *Client) resumeChange(s *session) {
	c.mu.Lock()
	p := c.rec.Pending
	c.mu.Unlock()
	if p != nil && s.ackSent != p.RID {
		c.sendAck(s)
	}
}

func (c *Client) handleMessage(it item) {
	if it.sess != nil {
		c.handleLoggedIn(it.sess) // a message proves the login was accepted
	}
	kind, sn := codec.ParseTopic(it.topic)
	if sn != c.id.SN {
		c.drop("foreign-topic")
		return
	}
	switch kind {
	case codec.TopicKey:
		c.handleControl(it.sess, it.payload)
	case codec.TopicDown:
		s := it.sess
		s.mu.Lock()
		ready := s.ready
		s.mu.Unlock()
		if !ready {
			if len(s.held) >= maxHeld {
				c.drop("held-overflow")
				return
			}
			s.held = append(s.held, it)
			return
		}
		c.handleData(it)
	default:
		c.drop("foreign-topic")
	}
}

func (c *Client) handleData(it item) {
	s := it.sess
	sub := it.topic[len(codec.DownTopic(c.id.SN, "")):]
	s.mu.Lock()
	aead := s.aead
	s.mu.Unlock()
	payload := it.payload
	if aead != nil {
		seq, plain, err := codec.Open(nil, aead, codec.Downlink, it.topic, it.payload)
		if err != nil {
			c.drop("decrypt")
			return
		}
		switch s.win.Check(seq) {
		case codec.Repeated:
			c.drop("replay", "seq", seq)
			return
		case codec.TooOld:
			c.drop("too-old", "seq", seq)
			return
		}
		s.win.Accept(seq)
		payload = plain
	} else if c.cfg.SessionKey && !c.cfg.AllowPlaintext {
		c.drop("plaintext")
		return
	}
	if c.cfg.OnData != nil {
		c.cfg.OnData(sub, payload)
	}
}

// handleControl verifies a message of the key topic and acts on it.
func (c *Client) handleControl(s *session, payload []byte) {
	m, err := codec.ParseControl(payload)
	if err != nil {
		c.drop("malformed", "err", err.Error())
		return
	}
	if m.Kind.Uplink() {
		c.drop("wrong-direction", "kind", string(m.Kind))
		return
	}
	if m.Alg != c.cfg.Alg {
		c.drop("alg", "kind", string(m.Kind))
		return
	}
	c.mu.Lock()
	rec := c.rec.Clone()
	c.mu.Unlock()
	newCreds := rec.New()
	pwdPending := rec.Pending != nil && rec.Pending.Params.What.Passwords()
	if m.Kind == codec.KindDone {
		// done is signed with the new downlink password.
		if !m.Verify(c.id, newCreds.Down) {
			c.drop("digest", "kind", string(m.Kind))
			return
		}
		c.handleDone(s, m, rec)
		return
	}
	viaCurrent := m.Verify(c.id, rec.Current.Down)
	viaNew := pwdPending && !viaCurrent && m.Verify(c.id, newCreds.Down)
	if !viaCurrent && !viaNew {
		c.drop("digest", "kind", string(m.Kind))
		return
	}
	if viaNew {
		// The platform signs with its current down: the pending change is
		// committed there (its done was lost).
		c.commitPending(rec.Pending.RID, "the platform signs with the new downlink password")
	}
	switch m.Kind {
	case codec.KindSK:
		c.handleSK(s, m)
	case codec.KindErr:
		c.handleErr(s, m)
	case codec.KindCfg:
		c.handleCfg(s, m)
	case codec.KindAcc:
		c.handleAcc(m)
	}
}

func (c *Client) handleSK(s *session, m codec.Control) {
	if s.bk == nil {
		c.drop("unrequested-sk")
		return
	}
	s.mu.Lock()
	have, sid := s.aead != nil, s.sid
	s.mu.Unlock()
	if have {
		if sid != m.SID {
			c.drop("second-sk")
		}
		return // the same key again (re-subscription)
	}
	ks, err := codec.UnwrapSessionKey(s.bk, c.id.SN, m.SID, m.Wrapped)
	if err != nil {
		c.drop("sk-unwrap")
		return
	}
	aead, err := codec.NewAEAD(ks)
	clear(ks)
	if err != nil {
		c.drop("sk-unwrap")
		return
	}
	if s.bkPending {
		// Wrapped under the pending new basic key: the platform holds it.
		c.commitPending(s.pendingRID, "session key under the new basic key")
	}
	s.mu.Lock()
	s.aead, s.sid, s.exp = aead, m.SID, m.Exp
	s.mu.Unlock()
	c.cfg.Logger.Info("m2m: session key", "sn", c.id.SN, "sid", m.SID.String(), "exp", m.Exp)
	c.emit(Event{Kind: EventSessionKey, SID: m.SID, Exp: time.Unix(int64(m.Exp), 0)})
	c.settle(s)
}

func (c *Client) handleErr(s *session, m codec.Control) {
	c.cfg.Logger.Warn("m2m: platform error", "sn", c.id.SN, "code", string(m.Code))
	c.emit(Event{Kind: EventPlatformError, ErrCode: m.Code})
	switch m.Code {
	case codec.CodeBKMismatch, codec.CodeBKExpired:
		if s.bkPending && m.Code == codec.CodeBKMismatch {
			s.bkRefused = true // the platform does not hold the pending bk (yet)
		}
		c.settle(s)
		c.mu.Lock()
		auto := c.cfg.AutoBKChange != "" && c.rec.Pending == nil && c.chgWait == nil
		c.mu.Unlock()
		if auto {
			go func() {
				ctx, cancel := context.WithTimeout(c.ctx, time.Minute)
				defer cancel()
				if _, err := c.RequestChange(ctx, codec.WhatBK, c.cfg.AutoBKChange); err != nil {
					c.cfg.Logger.Warn("m2m: automatic bk change failed", "err", err)
				}
			}()
		}
	case codec.CodeUnknownRID:
		c.mu.Lock()
		p := c.rec.Pending
		c.mu.Unlock()
		if p == nil || s.ackSent != p.RID {
			return
		}
		// The platform has no pending change rid. It committed it only if
		// the new values work: a login with the new up would have been
		// accepted as such (usedPending) and a session key under the new
		// bk would have committed it already. For a bk change whose bk we
		// could not probe, keep the values: the next login probes again.
		if p.Params.What.BasicKey() && !s.bkRefused {
			c.cfg.Logger.Warn("m2m: unknown-rid for a bk change not probed; keeping it", "rid", p.RID.String())
			return
		}
		c.discardPending(p.RID, "the platform does not know the change")
	default:
		c.answerChange(chgAnswer{err: &PlatformError{Code: m.Code}})
	}
}

func (c *Client) handleCfg(s *session, m codec.Control) {
	c.mu.Lock()
	rec := c.rec.Clone()
	seen := c.committed[m.RID]
	c.mu.Unlock()
	if seen {
		c.drop("replayed-cfg")
		return
	}
	if rec.Pending != nil && rec.Pending.RID == m.RID {
		if s.ackSent != m.RID {
			c.sendAck(s)
		}
		return
	}
	if len(rec.Current.BK) != codec.BasicKeySize {
		c.drop("cfg-without-bk")
		return
	}
	p, err := codec.UnwrapParams(rec.Current.BK, c.id.SN, m.RID, m.Wrapped)
	if err != nil && rec.Pending != nil && rec.Pending.Params.What.BasicKey() {
		// Wrapped under the pending new bk: the platform committed that
		// change (its done was lost) and starts another one.
		if p2, err2 := codec.UnwrapParams(rec.Pending.Params.BK, c.id.SN, m.RID, m.Wrapped); err2 == nil {
			c.commitPending(rec.Pending.RID, "new change wrapped under the new basic key")
			p, err = p2, nil
		}
	}
	if err != nil {
		c.drop("cfg-unwrap")
		return
	}
	c.applyChange(s, m.RID, p, codec.ModeCipher)
}

func (c *Client) handleAcc(m codec.Control) {
	c.answerChange(chgAnswer{rid: m.RID})
	if c.cfg.SMS == nil {
		c.emit(Event{Kind: EventError, RID: m.RID, Err: errors.New("the platform sends the change by SMS but no SMS inbox is configured")})
		return
	}
	c.mu.Lock()
	if c.rec.Pending != nil && c.rec.Pending.RID == m.RID {
		c.mu.Unlock()
		return // already received
	}
	if _, ok := c.smsWait[m.RID]; ok || c.closed {
		c.mu.Unlock()
		return
	}
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.SMSTimeout)
	c.smsWait[m.RID] = cancel
	c.mu.Unlock()
	c.emit(Event{Kind: EventAwaitingSMS, RID: m.RID, Mode: codec.ModeSMS})
	go c.waitSMS(ctx, cancel, m.RID)
}

// waitSMS reads the inbox until the SMS of rid arrives from the platform's
// number, then hands it to the loop.
func (c *Client) waitSMS(ctx context.Context, cancel context.CancelFunc, rid codec.ID) {
	handed := false
	defer func() {
		if handed {
			return // the loop forgets the wait when it takes the SMS
		}
		cancel()
		c.mu.Lock()
		delete(c.smsWait, rid)
		c.mu.Unlock()
	}()
	var after int64
	for {
		msg, err := c.cfg.SMS.Next(ctx, after)
		if err != nil {
			if ctx.Err() != nil {
				if c.ctx.Err() == nil {
					c.emit(Event{Kind: EventError, RID: rid, Err: fmt.Errorf("no SMS for the change: %w", ctx.Err())})
				}
				return
			}
			c.cfg.Logger.Warn("m2m: SMS inbox", "err", err)
			select {
			case <-time.After(time.Second):
			case <-ctx.Done():
			}
			continue
		}
		if msg.ID > after {
			after = msg.ID
		}
		if msg.From != c.cfg.PlatformNumber {
			c.drop("sms-sender")
			continue
		}
		sms, err := codec.ParseSMS([]byte(msg.Text))
		if err != nil {
			c.drop("sms-malformed", "err", err.Error())
			continue
		}
		if sms.SN != c.id.SN || sms.RID != rid {
			c.drop("sms-rid")
			continue
		}
		handed = true
		c.enqueue(item{kind: itemSMS, rid: rid, params: sms.Params})
		return
	}
}

func (c *Client) handleSMS(it item) {
	c.mu.Lock()
	s := c.sess
	cancel, waiting := c.smsWait[it.rid]
	delete(c.smsWait, it.rid)
	seen := c.committed[it.rid]
	c.mu.Unlock()
	if waiting {
		cancel()
	}
	if seen || !waiting {
		c.drop("sms-not-waiting")
		return
	}
	c.applyChange(s, it.rid, it.params, codec.ModeSMS)
}

// applyChange stores new values as pending, then acknowledges them.
func (c *Client) applyChange(s *session, rid codec.ID, p codec.Params, mode codec.Mode) {
	c.mu.Lock()
	old := c.rec.Pending
	c.mu.Unlock()
	if old != nil && old.RID != rid {
		// The platform holds at most one change: a new one means the old
		// one is over there (committed cases were recognised before).
		c.discardPending(old.RID, "replaced by a newer change")
	}
	pend := Pending{RID: rid, Params: cloneParams(p), Mode: mode, Received: c.cfg.Now()}
	if err := c.cfg.Store.SavePending(pend); err != nil {
		// Without the new values on disk, acknowledging them could lock
		// the terminal out after a power cut: no ack.
		c.cfg.Logger.Error("m2m: cannot store the pending change", "rid", rid.String(), "err", err)
		c.emit(Event{Kind: EventError, RID: rid, Err: fmt.Errorf("storing the change: %w", err)})
		return
	}
	c.mu.Lock()
	c.rec.Pending = &pend
	c.preferCurrent = false
	c.mu.Unlock()
	c.emit(Event{Kind: EventChangeReceived, RID: rid, What: p.What, Mode: mode})
	c.answerChange(chgAnswer{rid: rid})
	if s != nil {
		s.mu.Lock()
		live := s.connected && !s.ended
		s.mu.Unlock()
		if live {
			c.sendAck(s)
		}
	}
}

// sendAck sends the ack of the pending change on s.
func (c *Client) sendAck(s *session) {
	c.mu.Lock()
	rec := c.rec.Clone()
	c.mu.Unlock()
	pc := s.pc
	if rec.Pending == nil || pc == nil {
		return
	}
	p := rec.Pending
	nc := rec.New()
	ack := codec.Control{Kind: codec.KindAck, Alg: c.cfg.Alg, RID: p.RID, TS: unix32(c.cfg.Now())}
	if p.Params.What.BasicKey() {
		ack.BKD = codec.BasicKeyDigest(c.cfg.Alg, nc.BK, nc.BKExp)
	}
	n, err := c.nonce()
	if err != nil {
		c.emit(Event{Kind: EventError, Err: err})
		return
	}
	ack.Nonce = n
	payload, err := ack.Sign(c.id, nc.Up)
	if err != nil {
		c.emit(Event{Kind: EventError, Err: err})
		return
	}
	s.ackSent = p.RID
	c.publishControl(pc, payload, "ack")
	c.emit(Event{Kind: EventAckSent, RID: p.RID, What: p.Params.What})
}

// publishControl sends a control payload on $m2m/<sn>/ctl without blocking
// the loop on the acknowledgement.
func (c *Client) publishControl(pc mqtt.Client, payload []byte, what string) mqtt.Token {
	tok := pc.Publish(codec.CtlTopic(c.id.SN), 1, false, payload)
	go func() {
		if !tok.WaitTimeout(c.cfg.ConnectTimeout) || tok.Error() != nil {
			c.cfg.Logger.Warn("m2m: control message not acknowledged", "kind", what, "err", tok.Error())
		}
	}()
	return tok
}

func (c *Client) handleDone(s *session, m codec.Control, rec *Record) {
	if rec.Pending == nil || rec.Pending.RID != m.RID {
		c.mu.Lock()
		seen := c.committed[m.RID]
		c.mu.Unlock()
		if !seen {
			c.drop("unknown-done")
		}
		return
	}
	if !c.commitPending(m.RID, "done") {
		return
	}
	// The platform closes the connection after done; if it does not,
	// reconnect with the new values ourselves.
	go func() {
		select {
		case <-s.done:
		case <-c.ctx.Done():
		case <-time.After(c.cfg.reconnectGrace):
			c.forceReconnect()
		}
	}()
}

// commitPending commits the pending change rid in the store. It reports
// whether the change is now committed.
func (c *Client) commitPending(rid codec.ID, reason string) bool {
	c.mu.Lock()
	p := c.rec.Pending
	c.mu.Unlock()
	if p == nil || p.RID != rid {
		return false
	}
	if err := c.cfg.Store.Commit(rid); err != nil {
		c.cfg.Logger.Error("m2m: cannot commit the change", "rid", rid.String(), "err", err)
		c.emit(Event{Kind: EventError, RID: rid, Err: fmt.Errorf("committing the change: %w", err)})
		return false
	}
	c.mu.Lock()
	old := c.rec.Current
	c.rec.Current = c.rec.New()
	c.rec.Pending = nil
	c.committed[rid] = true
	c.preferCurrent = false
	c.mu.Unlock()
	old.Clear()
	c.cfg.Logger.Info("m2m: change committed", "sn", c.id.SN, "rid", rid.String(), "what", string(p.Params.What), "by", reason)
	c.emit(Event{Kind: EventChangeCommitted, RID: rid, What: p.Params.What, Reason: reason})
	return true
}

func (c *Client) discardPending(rid codec.ID, reason string) {
	if err := c.cfg.Store.Discard(rid); err != nil {
		c.emit(Event{Kind: EventError, RID: rid, Err: fmt.Errorf("discarding the change: %w", err)})
		return
	}
	c.mu.Lock()
	var what codec.What
	if p := c.rec.Pending; p != nil && p.RID == rid {
		what = p.Params.What
		c.rec.Pending = nil
	}
	c.preferCurrent = false
	c.mu.Unlock()
	c.cfg.Logger.Info("m2m: change discarded", "sn", c.id.SN, "rid", rid.String(), "by", reason)
	c.emit(Event{Kind: EventChangeDiscarded, RID: rid, What: what, Reason: reason})
}

// forceReconnect replaces the paho client: disconnect, then connect a new
// one (with automatic retries) that logs in with the current values.
func (c *Client) forceReconnect() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	old := c.pc
	c.mu.Unlock()
	if old != nil {
		old.Disconnect(100)
	}
	pc, st := c.newPaho(true)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.pc, c.ostore = pc, st
	c.mu.Unlock()
	pc.Connect()
}

func (c *Client) answerChange(a chgAnswer) {
	c.mu.Lock()
	ch := c.chgWait
	c.chgWait = nil
	c.mu.Unlock()
	if ch != nil {
		ch <- a
	}
}

// RequestChange asks the platform to change the access passwords, the basic
// key or both (SPEC section 7): it sends chg on $m2m/<sn>/ctl, signed with
// the current uplink password, and waits for the platform's answer. It
// returns the rid of the change once the platform sent the new values (cfg)
// or announced them by SMS (acc); the client then applies them, acks and
// reconnects by itself (watch for EventChangeCommitted). An err answer is a
// *PlatformError (busy, no-channel, ...). The platform decides the mode;
// mode is what the terminal asks for.
func (c *Client) RequestChange(ctx context.Context, what codec.What, mode codec.Mode) (codec.ID, error) {
	switch what {
	case codec.WhatPwd, codec.WhatBK, codec.WhatAll:
	default:
		return 0, fmt.Errorf("client: bad what %q", what)
	}
	if mode != codec.ModeCipher && mode != codec.ModeSMS {
		return 0, fmt.Errorf("client: bad mode %q", mode)
	}
	s, pc, err := c.activeSession(ctx)
	if err != nil {
		return 0, err
	}
	ch := make(chan chgAnswer, 1)
	c.mu.Lock()
	if c.rec.Pending != nil || c.chgWait != nil {
		c.mu.Unlock()
		return 0, ErrChangePending
	}
	c.chgWait = ch
	up := append([]byte(nil), c.rec.Current.Up...)
	msg := codec.Control{Kind: codec.KindChg, Alg: c.cfg.Alg, What: what, Mode: mode, TS: unix32(c.cfg.Now())}
	n, err := c.nonce()
	c.mu.Unlock()
	defer clear(up)
	cancelWait := func() {
		c.mu.Lock()
		if c.chgWait == ch {
			c.chgWait = nil
		}
		c.mu.Unlock()
	}
	if err != nil {
		cancelWait()
		return 0, err
	}
	msg.Nonce = n
	payload, err := msg.Sign(c.id, up)
	if err != nil {
		cancelWait()
		return 0, err
	}
	tok := c.publishControl(pc, payload, "chg")
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			cancelWait()
			return 0, err
		}
	case <-s.done:
		cancelWait()
		return 0, ErrSessionEnded
	case <-ctx.Done():
		cancelWait()
		return 0, ctx.Err()
	}
	c.emit(Event{Kind: EventChangeRequested, What: what, Mode: mode})
	select {
	case a := <-ch:
		return a.rid, a.err
	case <-ctx.Done():
		cancelWait()
		return 0, ctx.Err()
	}
}

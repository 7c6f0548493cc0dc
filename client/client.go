package client

import (
	"context"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/m2mguard/m2mguard/codec"
)

var cryptoRand io.Reader = rand.Reader

// maxHeld bounds the downlink messages held while a session waits for its
// key message.
const maxHeld = 64

// Client is an M2M1 terminal on an MQTT broker, over paho. Create it with
// New, then Connect; it reconnects by itself (with a fresh login token every
// time) until Close. All methods are safe for concurrent use.
type Client struct {
	cfg Config
	id  codec.Identity

	mu            sync.Mutex
	rec           *Record // the store's record, kept in step with it
	pc            mqtt.Client
	ostore        *sessionStore
	sess          *session // the session of the latest login attempt
	gen           uint64
	preferCurrent bool // the pending new password was refused: try the current one
	chgWait       chan chgAnswer
	smsWait       map[codec.ID]context.CancelFunc
	committed     map[codec.ID]bool
	dropped       map[string]uint64
	closed        bool
	connectedOnce bool          // a login was accepted before (for Event.Reconnect)
	changed       chan struct{} // closed and replaced on every session state change

	in      chan *item
	events  chan Event // nil without Config.OnEvent
	ctx     context.Context
	cancel  context.CancelFunc
	loopWG  sync.WaitGroup
	eventWG sync.WaitGroup
}

// session is the state of one MQTT connection (one login).
type session struct {
	gen         uint64
	usedPending bool        // the login's digest used the pending new up
	pendingRID  codec.ID    // the pending change at login time
	bk          []byte      // the basic key whose bkd the login carried, or nil
	bkPending   bool        // that key is the pending new one
	wantKey     bool        // the login carried flag 01
	pc          mqtt.Client // the paho client of this connection

	mu        sync.Mutex
	aead      cipher.AEAD
	sid       codec.ID
	exp       uint32
	seq       uint64 // last uplink seq sent
	connected bool
	ready     bool // the key question is settled (sk, err, or no key wanted)
	ended     bool
	done      chan struct{}

	// loop goroutine only
	announced    bool // EventConnected was emitted for this login
	win          codec.Window
	held         []item
	ackSent      codec.ID
	bkRefused    bool // the platform answered bk-mismatch to the login's bkd
	keyTimerStop func() bool
}

func (s *session) end() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.ended {
		s.ended = true
		s.connected = false
		close(s.done)
	}
}

type itemKind int

const (
	itemMessage   itemKind = iota
	itemLoggedIn           // the broker accepted a login (before the subscriptions)
	itemConnected          // ... and the client subscribed
	itemKeyTimeout
	itemSMS
	itemFunc
)

type item struct {
	kind    itemKind
	sess    *session
	topic   string
	payload []byte
	rid     codec.ID
	params  codec.Params
	fn      func()
}

type chgAnswer struct {
	rid codec.ID
	err error
}

// New checks cfg, loads the credentials from cfg.Store and returns a Client
// that is not connected yet.
func New(cfg Config) (*Client, error) {
	c, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	rec, err := c.Store.Load()
	if err != nil {
		return nil, fmt.Errorf("client: loading credentials: %w", err)
	}
	if err := rec.Current.Validate(); err != nil {
		return nil, fmt.Errorf("client: stored credentials: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cl := &Client{
		cfg: c, id: c.Identity, rec: rec,
		smsWait: map[codec.ID]context.CancelFunc{}, committed: map[codec.ID]bool{}, dropped: map[string]uint64{},
		changed: make(chan struct{}),
		// A queue of pointers: 256 items by value would cost ~45 KiB per
		// client up front, and an item is rare (a message, a login).
		in:  make(chan *item, 256),
		ctx: ctx, cancel: cancel,
	}
	cl.loopWG.Add(1)
	go cl.loop()
	if c.OnEvent != nil { // emit sends nothing without it
		cl.events = make(chan Event, 64)
		cl.eventWG.Add(1)
		go cl.eventLoop()
	}
	return cl, nil
}

// Connect logs in and returns once the broker accepted the login and, if a
// session key was asked for, the platform answered it (or KeyTimeout
// passed). A refused login is a *RefusedError (errors.Is ErrRefused); if a
// change is pending, the pending new password and the current one are both
// tried first, in the order SPEC section 7 implies (new first: a login with
// it commits the change on the platform). Any other failure wraps
// ErrUnreachable. After a successful Connect the client reconnects by
// itself whenever the connection drops, with a fresh login each time.
func (c *Client) Connect(ctx context.Context) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrNotConnected
	}
	if c.pc != nil && c.pc.IsConnectionOpen() {
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()
	var err error
	for attempt := 0; attempt < 2; attempt++ {
		pc, st := c.newPaho(false)
		c.mu.Lock()
		c.pc, c.ostore = pc, st
		c.mu.Unlock()
		tok := pc.Connect()
		select {
		case <-tok.Done():
		case <-ctx.Done():
			pc.Disconnect(0)
			c.forget(pc)
			return ctx.Err()
		}
		if err = tok.Error(); err == nil {
			c.mu.Lock()
			closed := c.closed
			c.mu.Unlock()
			if closed {
				pc.Disconnect(0)
				return ErrNotConnected
			}
			return c.waitReady(ctx)
		}
		c.forget(pc)
		err = connectError(tok, err)
		c.mu.Lock()
		retry := errors.Is(err, ErrRefused) && c.rec.Pending != nil && c.rec.Pending.Params.What.Passwords()
		c.mu.Unlock()
		if !retry {
			break
		}
	}
	return err
}

// forget drops pc as the client's paho client after a failed Connect.
func (c *Client) forget(pc mqtt.Client) {
	c.mu.Lock()
	if c.pc == pc {
		c.pc, c.ostore = nil, nil
	}
	c.mu.Unlock()
}

func connectError(tok mqtt.Token, err error) error {
	var rc byte
	if ct, ok := tok.(*mqtt.ConnectToken); ok {
		rc = ct.ReturnCode()
	}
	if isRefusal(rc, err) {
		if rc == 0 {
			rc = packets.ErrRefusedNotAuthorised
		}
		return &RefusedError{Code: rc}
	}
	return fmt.Errorf("%w: %v", ErrUnreachable, err)
}

func isRefusal(rc byte, err error) bool {
	switch rc {
	case packets.ErrRefusedBadUsernameOrPassword, packets.ErrRefusedNotAuthorised, 0x86, 0x87, 0x8A:
		return true
	}
	return errors.Is(err, packets.ErrorRefusedBadUsernameOrPassword) || errors.Is(err, packets.ErrorRefusedNotAuthorised)
}

// waitReady waits until the current session settled its key question.
func (c *Client) waitReady(ctx context.Context) error {
	for {
		c.mu.Lock()
		s, ch := c.sess, c.changed
		c.mu.Unlock()
		if s != nil {
			s.mu.Lock()
			ok := s.ready && s.connected || s.ended
			s.mu.Unlock()
			if ok {
				return nil
			}
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// activeSession waits for a connected session whose key question is
// settled.
func (c *Client) activeSession(ctx context.Context) (*session, mqtt.Client, error) {
	for {
		c.mu.Lock()
		s, pc, ch, closed := c.sess, c.pc, c.changed, c.closed
		c.mu.Unlock()
		if closed || pc == nil {
			return nil, nil, ErrNotConnected
		}
		if s != nil {
			s.mu.Lock()
			ok := s.connected && s.ready && !s.ended
			s.mu.Unlock()
			if ok {
				return s, s.pc, nil
			}
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
	}
}

func (c *Client) notify() {
	c.mu.Lock()
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

// Publish sends payload as uplink data on m2m/<sn>/up/<sub>. In a session
// with a session key it travels in an envelope (SPEC section 6) with the
// session's next sequence number. Publish waits for a connected session
// (and its key), then for the broker's acknowledgement at QoS 1 and 2.
func (c *Client) Publish(ctx context.Context, sub string, payload []byte, qos byte) error {
	if qos > 2 {
		return errors.New("client: qos must be 0, 1 or 2")
	}
	if strings.ContainsAny(sub, "+#\x00") {
		return errors.New("client: sub must be a topic name without wildcards")
	}
	s, pc, err := c.activeSession(ctx)
	if err != nil {
		return err
	}
	topic := codec.UpTopic(c.id.SN, sub)
	s.mu.Lock()
	body := payload
	if s.aead != nil {
		s.seq++
		body = codec.Seal(nil, s.aead, codec.Uplink, s.seq, topic, payload)
	} else if c.cfg.SessionKey && !c.cfg.AllowPlaintext {
		s.mu.Unlock()
		return ErrNoSessionKey
	}
	tok := pc.Publish(topic, qos, false, body)
	s.mu.Unlock()
	select {
	case <-tok.Done():
		return tok.Error()
	case <-s.done:
		return ErrSessionEnded
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close disconnects and stops the client. Pending changes stay in the
// store.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	pc, s := c.pc, c.sess
	for _, cancel := range c.smsWait {
		cancel()
	}
	c.mu.Unlock()
	if pc != nil {
		pc.Disconnect(250)
	}
	if s != nil {
		s.end()
	}
	c.cancel()
	c.loopWG.Wait()
	c.eventWG.Wait()
	c.notify()
	return nil
}

// SessionInfo describes the current connection.
type SessionInfo struct {
	Connected bool
	Encrypted bool      // a session key is in use
	SID       codec.ID  // of the session key
	Exp       time.Time // when the platform ends the session (zero without a key)
	UplinkSeq uint64    // the last uplink sequence number sent
}

// Session returns the state of the current connection.
func (c *Client) Session() SessionInfo {
	c.mu.Lock()
	s := c.sess
	c.mu.Unlock()
	if s == nil {
		return SessionInfo{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	si := SessionInfo{Connected: s.connected && !s.ended, Encrypted: s.aead != nil, SID: s.sid, UplinkSeq: s.seq}
	if s.aead != nil {
		si.Exp = time.Unix(int64(s.exp), 0)
	}
	return si
}

// Dropped returns how many received messages were dropped, by reason
// (e.g. "digest", "malformed", "replay", "decrypt").
func (c *Client) Dropped() map[string]uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[string]uint64, len(c.dropped))
	for k, v := range c.dropped {
		m[k] = v
	}
	return m
}

// Record returns a copy of the credentials the client holds (for tools;
// it contains secrets: do not print it).
func (c *Client) Record() *Record {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rec.Clone()
}

// ---------------------------------------------------------------- paho glue

type sessionStore struct{ *mqtt.MemoryStore }

// purgeOutbound forgets the outbound PUBLISH packets of a session that
// ended: their envelopes are sealed under that session's key, so resending
// them in the next session would only make the platform count failures.
func (s *sessionStore) purgeOutbound() {
	for _, k := range s.All() {
		if strings.HasPrefix(k, "o.") {
			if _, ok := s.Get(k).(*packets.PublishPacket); ok {
				s.Del(k)
			}
		}
	}
}

func (c *Client) newPaho(retry bool) (mqtt.Client, *sessionStore) {
	st := &sessionStore{mqtt.NewMemoryStore()}
	var self mqtt.Client // set below, before any connection attempt
	o := mqtt.NewClientOptions()
	for _, b := range c.cfg.Brokers {
		o.AddBroker(b)
	}
	o.SetClientID(c.id.SN)
	// Explicit 3.1.1: paho would otherwise retry a refused CONNECT as MQTT
	// 3.1 with the same password, i.e. the same nonce, which the platform
	// refuses as a replay.
	o.SetProtocolVersion(4)
	o.SetCleanSession(c.cfg.CleanSession)
	o.SetResumeSubs(false)
	o.SetAutoReconnect(true)
	o.SetConnectRetry(retry)
	o.SetConnectRetryInterval(5 * time.Second)
	o.SetMaxReconnectInterval(c.cfg.MaxReconnectInterval)
	o.SetKeepAlive(c.cfg.KeepAlive)
	o.SetConnectTimeout(c.cfg.ConnectTimeout)
	o.SetWriteTimeout(c.cfg.ConnectTimeout)
	o.SetOrderMatters(true)
	o.SetStore(st)
	if c.cfg.TLS != nil {
		o.SetTLSConfig(c.cfg.TLS)
	}
	o.SetCredentialsProvider(func() (string, string) {
		st.purgeOutbound()
		return c.credentials(self)
	})
	o.SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) { c.onMessage(m) })
	o.SetOnConnectHandler(c.onConnect)
	o.SetConnectionLostHandler(func(_ mqtt.Client, err error) {
		// paho calls this on a goroutine of its own, possibly after its
		// reconnection already started a new attempt: that attempt's
		// session (not connected yet) must not be ended. The session that
		// was lost is also ended by the next attempt's credentials call.
		c.mu.Lock()
		s := c.sess
		c.mu.Unlock()
		if s != nil {
			s.mu.Lock()
			live := s.connected
			s.mu.Unlock()
			if live {
				s.end()
			}
		}
		c.notify()
		// Through the loop: after whatever this connection delivered
		// before it dropped (a done, say), before the next login.
		c.enqueue(item{kind: itemFunc, fn: func() { c.emit(Event{Kind: EventConnectionLost, Err: err}) }})
	})
	o.SetConnectionNotificationHandler(func(_ mqtt.Client, n mqtt.ConnectionNotification) {
		f, ok := n.(mqtt.ConnectionNotificationFailed)
		if !ok || !isRefusal(0, f.Reason) {
			return
		}
		c.mu.Lock()
		s := c.sess
		usedPending := s != nil && s.usedPending
		if c.rec.Pending != nil && c.rec.Pending.Params.What.Passwords() {
			// Alternate between the new and the current values.
			c.preferCurrent = !c.preferCurrent
		}
		c.mu.Unlock()
		code := byte(packets.ErrRefusedNotAuthorised)
		if errors.Is(f.Reason, packets.ErrorRefusedBadUsernameOrPassword) {
			code = packets.ErrRefusedBadUsernameOrPassword
		}
		c.cfg.Logger.Warn("m2m: login refused", "sn", c.id.SN, "code", code, "pending", usedPending)
		c.emit(Event{Kind: EventRefused, Code: code, UsedPending: usedPending})
	})
	self = mqtt.NewClient(o)
	return self, st
}

// login is what one connection attempt presents.
type login struct {
	username, password string
	sess               *session
}

// LoginCredentials returns the CONNECT ClientID, Username and Password the
// next connection attempt would present (SPEC section 3), with ts from
// Config.Now and a fresh nonce from Config.Rand. With a pending change
// whose new password has not been refused, the password is signed with the
// new uplink password. It changes no state: the client builds every real
// attempt the same way, through paho's credentials provider.
func (c *Client) LoginCredentials() (clientID, username, password string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l, err := c.buildLogin()
	if err != nil {
		return "", "", "", err
	}
	return c.id.SN, l.username, l.password, nil
}

// credentials is paho's credentials provider: a fresh token for every
// attempt, and the session that attempt starts. It first lets the loop
// handle what the previous connection delivered, so that a login right
// after a done presents the values that done committed.
func (c *Client) credentials(pc mqtt.Client) (string, string) {
	c.drain(drainTimeout)
	c.mu.Lock()
	defer c.mu.Unlock()
	l, err := c.buildLogin()
	if err != nil {
		c.cfg.Logger.Error("m2m: cannot build login", "err", err)
		return c.id.Username(), ""
	}
	if c.sess != nil {
		c.sess.end()
	}
	l.sess.pc = pc
	c.sess = l.sess
	return l.username, l.password
}

// buildLogin must be called with c.mu held.
func (c *Client) buildLogin() (login, error) {
	rec := c.rec
	creds := rec.Current
	s := &session{done: make(chan struct{})}
	p := rec.Pending
	if p != nil {
		s.pendingRID = p.RID
		if p.Params.What.Passwords() && !c.preferCurrent {
			creds = rec.New()
			s.usedPending = true
		}
	}
	l := codec.Login{Identity: c.id, Alg: c.cfg.Alg, TS: unix32(c.cfg.Now())}
	// With a new basic key pending, the login carries its bkd even if no
	// session key is wanted: a session key under it proves the platform
	// committed the change; bk-mismatch proves it did not.
	bk, bkexp := rec.Current.BK, rec.Current.BKExp
	if p != nil && p.Params.What.BasicKey() {
		bk, bkexp, s.bkPending = p.Params.BK, p.Params.BKExp, true
	}
	if (c.cfg.SessionKey || s.bkPending) && len(bk) == codec.BasicKeySize {
		l.Flags = codec.FlagSessionKey
		l.BKD = codec.BasicKeyDigest(c.cfg.Alg, bk, bkexp)
		s.bk, s.wantKey = bk, true
	} else {
		s.bkPending = false
	}
	n, err := c.nonce()
	if err != nil {
		return login{}, err
	}
	l.Nonce = n
	pw, err := l.Sign(creds.Up)
	if err != nil {
		return login{}, err
	}
	c.gen++
	s.gen = c.gen
	return login{username: c.id.Username(), password: string(pw), sess: s}, nil
}

func unix32(t time.Time) uint32 {
	u := t.Unix()
	if u < 0 {
		return 0
	}
	if u > codec.Never-1 {
		return codec.Never - 1
	}
	return uint32(u)
}

func (c *Client) nonce() (codec.ID, error) {
	var b [8]byte
	if _, err := io.ReadFull(c.cfg.Rand, b[:]); err != nil {
		return 0, fmt.Errorf("client: reading a nonce: %w", err)
	}
	return codec.ID(binary.BigEndian.Uint64(b[:])), nil
}

// onConnect runs (on a goroutine of paho's) after every accepted login: it
// subscribes to the key topic, then to the downlink data.
func (c *Client) onConnect(pc mqtt.Client) {
	c.mu.Lock()
	s := c.sess
	c.mu.Unlock()
	if s == nil || s.pc != pc {
		return
	}
	c.enqueue(item{kind: itemLoggedIn, sess: s})
	downQoS := byte(1)
	if c.cfg.DownQoS != nil {
		downQoS = *c.cfg.DownQoS
	}
	for _, sub := range []struct {
		filter string
		qos    byte
	}{{codec.KeyTopic(c.id.SN), 1}, {codec.DownTopic(c.id.SN, "#"), downQoS}} {
		tok := pc.Subscribe(sub.filter, sub.qos, nil)
		if !tok.WaitTimeout(c.cfg.ConnectTimeout) || tok.Error() != nil {
			c.cfg.Logger.Warn("m2m: subscribe failed", "filter", sub.filter, "err", tok.Error())
			c.emit(Event{Kind: EventError, Err: fmt.Errorf("subscribe %s: %v", sub.filter, tok.Error())})
			continue
		}
		if st, ok := tok.(*mqtt.SubscribeToken); ok {
			for _, code := range st.Result() {
				if code >= 0x80 {
					c.emit(Event{Kind: EventError, Err: fmt.Errorf("subscribe %s refused (0x%02x)", sub.filter, code)})
				}
			}
		}
	}
	c.enqueue(item{kind: itemConnected, sess: s})
}

func (c *Client) onMessage(m mqtt.Message) {
	c.mu.Lock()
	s := c.sess
	c.mu.Unlock()
	c.enqueue(item{kind: itemMessage, sess: s, topic: m.Topic(), payload: append([]byte(nil), m.Payload()...)})
}

// drainTimeout bounds how long a login waits for the loop (drain).
const drainTimeout = 2 * time.Second

// drain waits until the loop has handled every item queued before the
// call, or timeout passes, or the client closes. It must not be called on
// the loop's goroutine.
func (c *Client) drain(timeout time.Duration) {
	done := make(chan struct{})
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case c.in <- &item{kind: itemFunc, fn: func() { close(done) }}:
	case <-c.ctx.Done():
		return
	case <-t.C:
		return
	}
	select {
	case <-done:
	case <-c.ctx.Done():
	case <-t.C:
	}
}

func (c *Client) enqueue(it item) {
	select {
	case c.in <- &it:
	case <-c.ctx.Done():
	}
}

func (c *Client) emit(e Event) {
	if c.cfg.OnEvent == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = c.cfg.Now()
	}
	select {
	case c.events <- e:
	case <-c.ctx.Done():
	}
}

// eventLoop calls OnEvent, one event at a time; after Close it delivers
// what is already queued and stops.
func (c *Client) eventLoop() {
	defer c.eventWG.Done()
	for {
		select {
		case e := <-c.events:
			c.cfg.OnEvent(e)
		case <-c.ctx.Done():
			for {
				select {
				case e := <-c.events:
					c.cfg.OnEvent(e)
				default:
					return
				}
			}
		}
	}
}

func (c *Client) drop(reason string, attrs ...any) {
	c.mu.Lock()
	c.dropped[reason]++
	c.mu.Unlock()
	c.cfg.Logger.Warn("m2m: message dropped", append([]any{"sn", c.id.SN, "reason", reason}, attrs...)...)
	c.emit(Event{Kind: EventDropped, Reason: reason})
}

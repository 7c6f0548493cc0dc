package hook

import (
	"crypto/cipher"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

type clientKind uint8

const (
	kindTerminal clientKind = iota + 1
	kindApp
)

func (k clientKind) String() string {
	if k == kindTerminal {
		return "terminal"
	}
	return "application"
}

// session is what the hook knows of one authenticated connection. Fields
// set at login are read-only afterwards; the rest are atomics or belong to
// the connection's read goroutine.
type session struct {
	kind clientKind

	// terminals
	sn         string
	id         codec.Identity
	alg        codec.Alg
	down       []byte // downlink password at login: signs key-topic messages
	requireEnc bool
	keyTopic   string // $m2m/<sn>/key
	downFilter string // m2m/<sn>/down/#

	// The session key, nil without one. Its AEAD is built on the first
	// envelope, not at login: most terminals of a fleet are idle most of
	// the time, and an AES-GCM instance costs ~1.2 KiB of heap where the
	// key costs 32 bytes. Then the one AEAD serves every envelope.
	key      []byte
	aeadOnce sync.Once
	aeadInst cipher.AEAD

	revokeSeq uint64 // revocations.current() before the login read the record

	seq   uint64    // unique in the hook: SessionRef.Seq
	since time.Time // when the session was established (its CONNACK out)
	// takenOver is set when a login on another broker of the fleet took
	// the session over: its MQTT session is discarded, not kept offline.
	takenOver atomic.Bool

	sid    codec.ID
	exp    time.Time
	bkSync bool // bkd matched a valid bk at this login: ciphertext changes are possible
	timer  *time.Timer

	// state is the session's place in its life (pending, established,
	// ended); see lifecycle.go.
	state atomic.Uint32
	// ending is set once the hook has decided to end the connection: later
	// control messages and envelopes are dropped unanswered and unlogged.
	ending atomic.Bool
	// endReason is the reason the hook ended the session for (markEnding),
	// reported in the disconnected event; nil if it did not end it.
	endReason atomic.Pointer[string]

	// Key-topic messages wait in keyq (at most maxKeyQueue) until the
	// terminal has subscribed to $m2m/<sn>/key, then a writer goroutine,
	// started on demand, sends them in order (see writes.go). closeAfter
	// ends the connection once the PUBACK of the control message being
	// handled is out (after a committed change); closeCode, if set, ends
	// it once the writer has sent what is queued.
	mu         sync.Mutex
	subscribed bool
	writing    bool // a writer goroutine drains keyq
	keyq       [][]byte
	keyqFirst  [1][]byte // keyq's array for the login's sk or err: no allocation of its own
	closeCode  *packets.Code
	closeAfter atomic.Bool
	ctlRefused atomic.Int32 // control messages of this session refused
	// keyWritten is set once the writer has written the session's first
	// key message: with a session key, its sk (queued first at login).
	// Downlink data is ready for it from then on (downready.go).
	keyWritten atomic.Bool

	// The record and pending change seen at login, for deliverPending once
	// the session is established (then nil).
	loginRecord  *keysvc.Terminal
	loginPending *keysvc.Change
	// startSent is the rid of the last operator's change sent on this
	// connection by changeDesk.start or startedDuringLogin: both may find
	// a change started while the login was in progress, the first sends it.
	startSent atomic.Uint64

	upWindow  codec.Window  // uplink anti-replay; only the read goroutine touches it
	upTop     atomic.Uint64 // upWindow.Top(), for Sessions
	downSeq   atomic.Uint64 // last downlink seq sealed
	envFailed atomic.Int32  // envelopes of this session that failed

	// applications
	app *keysvc.App

	// offline marks the identity kept for a persistent session whose
	// connection is gone (identityOnly): messages are queued for whichever
	// connection resumes it.
	offline bool

	// parked holds the downlink data of the MQTT session that this
	// connection may not receive (withholdsDownlink), outside mochi's
	// session so that nothing writes it. It goes back into the session
	// when the connection ends or hands the session on (inherit.go).
	// afterKey marks parked messages that wait only for the session key
	// to be written (a resumed session with a key: inherit.go), not
	// withheld from this connection.
	parkMu   sync.Mutex
	parked   []packets.Packet
	afterKey bool
}

func newTerminalSession(t *keysvc.Terminal) *session {
	// One string holds both topics, $m2m/<sn>/key then m2m/<sn>/down/#:
	// one allocation a login instead of two.
	topics := "$m2m/" + t.SN + "/key" + "m2m/" + t.SN + "/down/#"
	key := len("$m2m/") + len(t.SN) + len("/key")
	return &session{
		kind:       kindTerminal,
		sn:         t.SN,
		id:         codec.Identity{SN: t.SN, IMEI: t.IMEI, IMSI: t.IMSI},
		alg:        t.Alg,
		down:       t.Creds.Down,
		requireEnc: t.RequireEncryption,
		keyTopic:   topics[:key],
		downFilter: topics[key:],
	}
}

// hasKey reports whether the session has a session key.
func (s *session) hasKey() bool { return s.key != nil }

// awaitsKey reports whether downlink data this connection inherits must
// wait until its session key is written: a terminal that logged in with
// one cannot open data sealed under it before it has the key (inherit.go).
func (s *session) awaitsKey() bool { return s.kind == kindTerminal && s.hasKey() }

// aead returns the AEAD of the session key, built on first use. It is nil
// only if the key cannot make one, which newSessionKey rules out (callers
// still fail closed on nil).
func (s *session) aead() cipher.AEAD {
	s.aeadOnce.Do(func() {
		if a, err := codec.NewAEAD(s.key); err == nil {
			s.aeadInst = a
		}
	})
	return s.aeadInst
}

// identityOnly returns what the ACL needs of a session whose connection is
// gone: who it was and its reach, without its key.
func (s *session) identityOnly() *session {
	return &session{
		kind: s.kind, sn: s.sn, id: s.id, requireEnc: s.requireEnc,
		keyTopic: s.keyTopic, downFilter: s.downFilter, app: s.app, offline: true,
	}
}

// withholdsDownlink reports whether downlink data must not reach this
// connection: its terminal's record demands encryption and it logged in
// without a session key (no flag 01, or its bkd did not match). A session
// kept for an offline terminal withholds nothing: it queues for the next
// connection, which seals or withholds at its turn.
func (s *session) withholdsDownlink() bool {
	return s.kind == kindTerminal && s.requireEnc && !s.hasKey() && !s.offline
}

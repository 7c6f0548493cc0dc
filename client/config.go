package client

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/m2mguard/m2mguard/codec"
)

// Config configures a Client. The zero value of every field except Brokers,
// Identity, Alg and Store is usable.
type Config struct {
	// Brokers are the broker URLs, tried in order on every connection
	// attempt: tcp://host:1883, ssl://host:8883 (or tls://, mqtts://),
	// ws://host/mqtt, wss://host/mqtt.
	Brokers []string
	// TLS is used for ssl:// and wss:// brokers (nil: the system roots).
	TLS *tls.Config

	// Identity is the terminal's sn, IMEI and IMSI.
	Identity codec.Identity
	// Alg is the digest algorithm of the terminal's record (md5 or hs256).
	Alg codec.Alg
	// Store holds the credentials: current, and pending while a change is
	// in flight.
	Store CredentialStore

	// SessionKey asks for a session key at every login (flag 01 with the
	// bkd of the basic key) and encrypts data with it (SPEC sections 5, 6).
	SessionKey bool
	// AllowPlaintext lets Publish send plaintext when SessionKey is set but
	// the platform issued no key for this session (err bk-mismatch or
	// bk-expired). By default Publish fails with ErrNoSessionKey instead.
	AllowPlaintext bool
	// AutoBKChange, if set, makes the client request a change of its basic
	// key in this mode when the platform answers a login with bk-mismatch
	// or bk-expired.
	AutoBKChange codec.Mode

	// SMS is the SMS bearer, needed for changes delivered by SMS (acc).
	SMS SMSInbox
	// PlatformNumber is the sender number of the platform's SMS; an SMS
	// from any other number is ignored. Required when SMS is set.
	PlatformNumber string
	// SMSTimeout bounds the wait for the SMS after an acc (default 1 h).
	SMSTimeout time.Duration

	// OnData receives downlink application data as plaintext: sub is the
	// topic below m2m/<sn>/down/. It runs on the client's message
	// goroutine: do not block in it.
	OnData func(sub string, payload []byte)
	// OnEvent receives state changes. Calls are serialised on a goroutine
	// of their own.
	OnEvent func(Event)

	// Now is the clock (default time.Now). The login ts and control ts come
	// from it.
	Now func() time.Time
	// Rand is the source of login and control nonces (default
	// crypto/rand.Reader).
	Rand io.Reader
	// Logger receives diagnostics (default: discard). Secrets, digests and
	// payloads are never logged.
	Logger *slog.Logger

	// CleanSession asks the broker for a clean MQTT session at every
	// connection. By default the session persists, so that downlink data
	// queued while the terminal is offline is delivered when it returns
	// (encrypted by the platform under the new session's key).
	CleanSession bool
	// KeepAlive is the MQTT keep-alive (default 60 s).
	KeepAlive time.Duration
	// ConnectTimeout bounds one connection attempt (default 10 s).
	ConnectTimeout time.Duration
	// MaxReconnectInterval caps paho's back-off between automatic
	// reconnection attempts (default 1 min).
	MaxReconnectInterval time.Duration
	// KeyTimeout is how long Connect and Publish wait for the platform's
	// answer (sk or err) to a login with flag 01 (default 10 s).
	KeyTimeout time.Duration
	// DownQoS is the QoS of the downlink data subscription (default 1).
	DownQoS *byte

	// reconnectGrace is how long the client waits, after committing a
	// change on done, for the platform to close the connection before it
	// reconnects by itself with the new values (default 3 s; tests shorten
	// it).
	reconnectGrace time.Duration
}

func (c *Config) withDefaults() (Config, error) {
	cfg := *c
	if len(cfg.Brokers) == 0 {
		return cfg, errors.New("client: no broker URL")
	}
	if err := cfg.Identity.Validate(); err != nil {
		return cfg, fmt.Errorf("client: identity: %w", err)
	}
	if cfg.Alg != codec.MD5 && cfg.Alg != codec.HS256 {
		return cfg, errors.New("client: alg must be md5 or hs256")
	}
	if cfg.Store == nil {
		return cfg, errors.New("client: no credential store")
	}
	if cfg.SMS != nil && cfg.PlatformNumber == "" {
		return cfg, errors.New("client: SMS inbox without PlatformNumber")
	}
	switch cfg.AutoBKChange {
	case "", codec.ModeCipher, codec.ModeSMS:
	default:
		return cfg, errors.New("client: AutoBKChange must be cipher, sms or empty")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = cryptoRand
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.SMSTimeout <= 0 {
		cfg.SMSTimeout = time.Hour
	}
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = 60 * time.Second
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	if cfg.MaxReconnectInterval <= 0 {
		cfg.MaxReconnectInterval = time.Minute
	}
	if cfg.reconnectGrace <= 0 {
		cfg.reconnectGrace = 3 * time.Second
	}
	if cfg.KeyTimeout <= 0 {
		cfg.KeyTimeout = 10 * time.Second
	}
	return cfg, nil
}

var (
	// ErrRefused: the broker refused the credentials (CONNACK 0x04 or 0x05
	// under MQTT 3.1.1; 0x86, 0x87 or 0x8A under MQTT 5). The error is a
	// *RefusedError carrying the code.
	ErrRefused = errors.New("client: credentials refused by the broker")
	// ErrUnreachable: no broker could be reached (network error, TLS
	// failure, timeout, or CONNACK 0x03 server unavailable).
	ErrUnreachable = errors.New("client: broker unreachable")
	// ErrNotConnected: the client has no connection (Close was called or
	// Connect never succeeded).
	ErrNotConnected = errors.New("client: not connected")
	// ErrNoSessionKey: a session key was wanted but the platform issued
	// none for this session, and AllowPlaintext is off.
	ErrNoSessionKey = errors.New("client: no session key in this session")
	// ErrSessionEnded: the connection was lost before the broker
	// acknowledged the message; it may or may not have been delivered.
	ErrSessionEnded = errors.New("client: session ended before the broker acknowledged")
	// ErrChangePending: a change is already in flight on this terminal.
	ErrChangePending = errors.New("client: a change is already pending")
)

// RefusedError is the error of a refused login. errors.Is(err, ErrRefused)
// holds for it.
type RefusedError struct {
	Code byte // the CONNACK return or reason code
}

// Error names the CONNACK code.
func (e *RefusedError) Error() string {
	return fmt.Sprintf("client: credentials refused by the broker (CONNACK 0x%02x)", e.Code)
}

// Is makes errors.Is(err, ErrRefused) true.
func (e *RefusedError) Is(target error) bool { return target == ErrRefused }

// PlatformError is an err message of the platform (SPEC section 7), as
// returned by RequestChange.
type PlatformError struct {
	Code codec.ErrCode
}

// Error names the platform's code.
func (e *PlatformError) Error() string { return "client: platform answered " + string(e.Code) }

// EventKind names what an Event reports.
type EventKind int

// The events.
const (
	EventConnected       EventKind = iota + 1 // a login was accepted (Reconnect tells whether it was automatic)
	EventConnectionLost                       // the connection dropped (Err says why); paho reconnects
	EventRefused                              // a login was refused (Code); see also UsedPending
	EventSessionKey                           // a session key arrived (SID, Exp)
	EventNoSessionKey                         // no session key for this session (KeyTimeout passed)
	EventPlatformError                        // the platform sent err (ErrCode)
	EventChangeRequested                      // a chg was sent (What, Mode)
	EventAwaitingSMS                          // the platform answered acc: waiting for the SMS of RID
	EventChangeReceived                       // new values of RID received and stored as pending (the ack follows)
	EventChangeCommitted                      // the change RID is committed; the new values are current
	EventChangeDiscarded                      // the platform no longer knows RID; the old values stay
	EventDropped                              // a message was dropped (Reason)
	EventError                                // a local failure (Err), e.g. the store could not be written
	EventAckSent                              // the ack of the pending change RID was sent (signed with the new up)
)

var eventNames = map[EventKind]string{
	EventConnected: "connected", EventConnectionLost: "connection-lost", EventRefused: "refused",
	EventSessionKey: "session-key", EventNoSessionKey: "no-session-key", EventPlatformError: "platform-error",
	EventChangeRequested: "change-requested", EventAwaitingSMS: "awaiting-sms", EventChangeReceived: "change-received",
	EventChangeCommitted: "change-committed", EventChangeDiscarded: "change-discarded", EventDropped: "dropped",
	EventError: "error", EventAckSent: "ack-sent",
}

// String returns the event's name, e.g. "session-key".
func (k EventKind) String() string {
	if s, ok := eventNames[k]; ok {
		return s
	}
	return fmt.Sprintf("event(%d)", int(k))
}

// Event is a state change of the client. Only the fields that matter for
// Kind are set. An Event never carries a secret. Events are delivered in
// the order they happen: a login's connected before its session-key, a
// change's change-received, ack-sent and change-committed before the
// connection-lost of the connection the platform then closes, and that
// before the next login's connected.
type Event struct {
	Kind        EventKind
	Time        time.Time     // from Config.Now
	Reconnect   bool          // Connected: an automatic reconnection
	UsedPending bool          // Connected, Refused: the login used the pending new password
	Code        byte          // Refused: the CONNACK code
	ErrCode     codec.ErrCode // PlatformError
	SID         codec.ID      // SessionKey
	Exp         time.Time     // SessionKey: when the platform ends the session
	RID         codec.ID      // change events
	What        codec.What    // change events
	Mode        codec.Mode    // ChangeRequested, ChangeReceived
	Reason      string        // Dropped, ChangeCommitted, ChangeDiscarded: why
	Err         error         // ConnectionLost, Error
}

// String renders the event for people (the m2m-terminal output).
func (e Event) String() string {
	s := e.Kind.String()
	switch e.Kind {
	case EventConnected:
		if e.Reconnect {
			s += " (reconnect)"
		}
		if e.UsedPending {
			s += " with the pending new password"
		}
	case EventRefused:
		s += fmt.Sprintf(" CONNACK 0x%02x", e.Code)
		if e.UsedPending {
			s += " (pending new password; falling back to the current one)"
		}
	case EventSessionKey:
		s += fmt.Sprintf(" sid=%s exp=%s", e.SID, e.Exp.UTC().Format(time.RFC3339))
	case EventPlatformError:
		s += " " + string(e.ErrCode)
	case EventChangeRequested:
		s += fmt.Sprintf(" what=%s mode=%s", e.What, e.Mode)
	case EventAwaitingSMS:
		s += " rid=" + e.RID.String()
	case EventChangeReceived:
		s += fmt.Sprintf(" rid=%s what=%s mode=%s", e.RID, e.What, e.Mode)
	case EventChangeCommitted, EventChangeDiscarded, EventAckSent:
		s += fmt.Sprintf(" rid=%s what=%s", e.RID, e.What)
	}
	if e.Reason != "" {
		s += ": " + e.Reason
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

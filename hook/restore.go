package hook

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Restarts (README, "Sessions across restarts"). With a storage hook
// (package sessionstore in the broker) mochi restores the persistent
// sessions at start: clients, subscriptions, queued messages. What the
// hook knew of them was in memory:
//
//   - Who an offline session belongs to (h.offline), which the
//     per-recipient ACL checks before mochi queues a message for it. mochi
//     reports every restored session with OnDisconnect, a client without a
//     connection for which the hook has no session; the hook notes it as
//     restored and resolves its identity the first time a message is
//     checked for it: a terminal by its ClientID (its sn) through the
//     registry's cached Lookup, an application by the username of its
//     last login if that application still owns the ClientID. A terminal
//     or application that no longer exists gets nothing queued; while the
//     registry is unavailable, nothing is queued for the session (fail
//     closed) and the lookup is retried at most every restoreRetry.
//   - What the hook changes in a session behind mochi's back, which mochi
//     does not report to storage hooks: messages and subscriptions the
//     sieve drops from a resumed session, downlink held back from a keyless
//     terminal (parked), a session discarded because a login on another
//     broker of a fleet took it over (Hook.TakenOver). The hook tells
//     Options.Storage, so that the store holds the session as the hook
//     left it: parked downlink survives a restart there and reaches the
//     next session with a key, and a taken-over session does not come
//     back.
//
// Nothing else is restored, by design: session keys are never stored, so
// the login that resumes a session gets a new key and the queued downlink
// is sealed under it when it is written (OnPacketEncode); key-topic
// messages belong to a connection; pending changes live in the registry.

// Storage is what the hook tells a mochi storage hook added to the same
// server (sessionstore.Hook; mochi's own storage hooks have the same
// methods) of the changes it makes to a session itself.
type Storage interface {
	OnQosPublish(cl *mqtt.Client, pk packets.Packet, sent int64, resends int)
	OnQosDropped(cl *mqtt.Client, pk packets.Packet)
	OnUnsubscribed(cl *mqtt.Client, pk packets.Packet)
	// OnClientExpired: the hook discarded cl's session (taken over by a
	// login on another broker of a fleet, Hook.TakenOver): it must not
	// come back at a restart.
	OnClientExpired(cl *mqtt.Client)
}

// restoreRetry is how long a restored session whose identity could not be
// looked up (registry unavailable) gets nothing queued before the next try.
const restoreRetry = 5 * time.Second

// restored is the offline entry of a session restored from a store, until
// its identity is resolved.
type restored struct {
	clientID, username string

	mu      sync.Mutex
	s       *session // the identity, once resolved
	gone    bool     // no terminal or application owns the ClientID
	retryAt time.Time
}

// noteRestored records a session mochi restored from a store at start.
func (h *Hook) noteRestored(cl *mqtt.Client) {
	h.offline.Store(cl.ID, &restored{clientID: cl.ID, username: string(cl.Properties.Username)})
}

// offlineIdentity returns the identity of cl's persistent session whose
// connection is gone, for a message to be queued there; nil if cl is
// connected or its session is not one the hook knows.
func (h *Hook) offlineIdentity(cl *mqtt.Client) *session {
	v, ok := h.offline.Load(cl.ID)
	if !ok || !cl.Closed() {
		return nil
	}
	switch o := v.(type) {
	case *session:
		return o
	case *restored:
		return h.resolve(o)
	}
	return nil
}

// resolve looks the identity of a restored session up once (concurrent
// callers wait for the first) and replaces the offline entry with it.
func (h *Hook) resolve(r *restored) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.s != nil || r.gone {
		return r.s
	}
	now := time.Now()
	if now.Before(r.retryAt) {
		return nil
	}
	ctx, cancel := h.ctx()
	defer cancel()
	s, err := h.identify(ctx, r.clientID, r.username)
	switch {
	case err == nil:
		r.s = s
		h.offline.CompareAndSwap(r.clientID, r, s)
	case errors.Is(err, keysvc.ErrNotFound), errors.Is(err, keysvc.ErrInvalid):
		r.gone = true
		h.event(slog.LevelInfo, "restored_session_orphaned", "client_id", clip(r.clientID))
	default:
		r.retryAt = now.Add(restoreRetry)
		h.event(slog.LevelWarn, "restored_session_unresolved", "client_id", clip(r.clientID), "err", err.Error())
	}
	return r.s
}

// identify returns the identity (identityOnly) of the session of clientID
// as the registry knows it now, by the rules of authenticate.
func (h *Hook) identify(ctx context.Context, clientID, username string) (*session, error) {
	if codec.ValidateSN(clientID) == nil {
		t, err := h.reg.Lookup(ctx, clientID)
		if err != nil {
			return nil, err
		}
		return newTerminalSession(t).identityOnly(), nil
	}
	if username == "" || !keysvc.AppOwnsClientID(username, clientID) {
		return nil, keysvc.ErrNotFound
	}
	app, err := h.reg.GetApp(ctx, username)
	if err != nil {
		return nil, err
	}
	return (&session{kind: kindApp, app: app}).identityOnly(), nil
}

// The sieve's changes, told to the storage hook.

// storeDropped: m was dropped from cl's session.
func (h *Hook) storeDropped(cl *mqtt.Client, m packets.Packet) {
	if h.opts.Storage != nil {
		h.opts.Storage.OnQosDropped(cl, m)
	}
}

// storeKept: m belongs to cl's session (parked, or put back under a new
// packet id); mochi's storage hooks may have dropped it at the takeover.
func (h *Hook) storeKept(cl *mqtt.Client, m packets.Packet) {
	if h.opts.Storage != nil {
		h.opts.Storage.OnQosPublish(cl, m, m.Created, 0)
	}
}

// storeUnsubscribed: filter was removed from cl's session.
func (h *Hook) storeUnsubscribed(cl *mqtt.Client, filter string) {
	if h.opts.Storage != nil {
		h.opts.Storage.OnUnsubscribed(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Unsubscribe},
			Filters: packets.Subscriptions{{Filter: filter}}})
	}
}

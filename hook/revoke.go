package hook

import (
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Reasons for Revoke, as they appear in the session_ended event.
const (
	RevokeDisabled = "disabled" // an operator disabled the terminal
	RevokeDeleted  = "deleted"  // an operator deleted the terminal
	RevokeRekeyed  = "rekeyed"  // an operator replaced its credentials out of band
)

// Revoke ends the live sessions of terminal sn on this broker at once, with
// or without a session key, and keeps a login that is in flight at this
// moment from completing (it read the record before the operator's
// change). Call it after the key service has disabled, deleted or re-keyed
// the terminal: from then on its logins are refused by the record itself.
// It returns how many sessions it ended. It does not block on a client
// that stopped reading.
func (h *Hook) Revoke(sn, reason string) int { return h.RevokeBy(sn, reason, "") }

// RevokeBy is Revoke on behalf of operator (the name of the admin API's
// token), which the session_ended events name.
func (h *Hook) RevokeBy(sn, reason, operator string) int {
	h.revoked.add(sn, h.opts.Now())
	h.changes.forget(sn)
	type target struct {
		cl *mqtt.Client
		s  *session
	}
	var ended []target
	h.sessions.Range(func(k, v any) bool {
		if s := v.(*session); s.kind == kindTerminal && s.sn == sn {
			ended = append(ended, target{k.(*mqtt.Client), s})
		}
		return true
	})
	for _, e := range ended {
		if h.writer.markEndingBy(e.s, reason, operator) {
			h.writer.endConnection(e.cl, packets.ErrNotAuthorized)
		}
	}
	return len(ended)
}

// revocations remember which terminals an operator revoked lately, so that
// a login that read the record just before the revocation and registers its
// session just after it is refused (Revoke cannot see a session that is not
// registered yet). The common case, no revocation during a login, costs one
// atomic load.
type revocations struct {
	seq    atomic.Uint64
	mu     sync.Mutex
	recent map[string]revocation
}

type revocation struct {
	seq uint64
	at  time.Time
}

// revocationMemory is how long a revocation is remembered: longer than any
// login can take (they are bounded by the store timeout).
const revocationMemory = time.Minute

func (r *revocations) add(sn string, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.recent == nil {
		r.recent = make(map[string]revocation)
	}
	if len(r.recent) >= 1024 {
		for k, v := range r.recent {
			if now.Sub(v.at) > revocationMemory {
				delete(r.recent, k)
			}
		}
	}
	r.recent[sn] = revocation{seq: r.seq.Add(1), at: now}
}

// current returns the revocation sequence number; take it before reading
// the record a login is decided on.
func (r *revocations) current() uint64 { return r.seq.Load() }

// since reports whether sn was revoked after seq.
func (r *revocations) since(sn string, seq uint64) bool {
	if r.seq.Load() == seq {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	v, ok := r.recent[sn]
	return ok && v.seq > seq
}

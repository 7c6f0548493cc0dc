package hook

import (
	"context"
	"log/slog"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// The state a broker shares with the others of a fleet, one interface per
// concern: ReplayGuard (claims, guard.go), Throttler (failure counts,
// guard.go), SessionDirectory (who holds which session) and ChangeBook
// (credential-change work that outlives a message). Each has a local
// implementation, a single broker's behaviour, which the hook uses when
// the option is nil; package fleetlink implements them on NATS JetStream.
// The hook itself has no NATS code.

// SessionDirectory is told of every session this broker establishes and
// ends, so that the brokers of a fleet know which of them holds each
// ClientID: a newer login of the ClientID on another broker then ends the
// session here (Hook.TakenOver), and the session list spans the fleet. Its
// methods run on the login path and when connections end: they must not
// block. nil = none (a single broker: mochi itself ends a taken-over
// connection).
type SessionDirectory interface {
	// SessionStarted: the session's CONNACK is out.
	SessionStarted(ref SessionRef, info SessionInfo)
	// SessionEnded: the session's connection is gone (its MQTT session
	// may persist on this broker, offline).
	SessionEnded(ref SessionRef)
}

// SessionRef names one session of this broker: its ClientID and a number
// unique in the hook, so that the end of an old connection is never taken
// for the end of a newer one with the same ClientID.
type SessionRef struct {
	ClientID string
	Seq      uint64
}

// TakenOver ends this broker's session ref because a newer login of its
// ClientID on another broker of the fleet took it over: a live connection
// is ended (MQTT 5: DISCONNECT 0x8E session taken over), and the MQTT
// session mochi keeps for the ClientID (a persistent one) is discarded
// with what was queued for it: the client's session lives on the other
// broker now. A newer session of the ClientID on this broker (another
// Seq) is left alone; ref.Seq 0 names whatever offline session is kept.
// It reports whether it ended or discarded anything. It returns within
// DisconnectTimeout, even if the client does not read.
func (h *Hook) TakenOver(ref SessionRef) bool {
	cl, ok := h.server.Clients.Get(ref.ClientID)
	if !ok {
		_, kept := h.offline.LoadAndDelete(ref.ClientID)
		return kept
	}
	if cl.Closed() {
		if s := h.session(cl); s != nil && s.state.Load() != stateEnded {
			return false // OnDisconnect has not run yet for it; it will find it taken over
		}
		h.discardSession(cl, true)
		return true
	}
	s := h.session(cl)
	if s == nil || s.seq != ref.Seq || s.state.Load() != stateEstablished {
		return false // a newer login here, or one still being decided
	}
	s.takenOver.Store(true) // OnDisconnect discards the MQTT session
	h.writer.markEnding(s, "taken-over")
	h.writer.endConnection(cl, packets.ErrSessionTakenOver)
	return true
}

// discardSession drops the MQTT session of cl, whose connection is gone,
// unless a new connection has taken it meanwhile, from mochi and from the
// storage hook (Options.Storage), so that a restart does not restore it.
// With hand, its downlink data goes to Options.OnDownlinksDiscarded first.
func (h *Hook) discardSession(cl *mqtt.Client, hand bool) {
	if cur, ok := h.server.Clients.Get(cl.ID); ok && cur == cl {
		if hand {
			h.handDownlinks(cl, nil)
		}
		cl.ClearInflights()
		h.server.UnsubscribeClient(cl)
		h.server.Clients.Delete(cl.ID)
		if h.opts.Storage != nil {
			h.opts.Storage.OnClientExpired(cl)
		}
	}
	h.offline.Delete(cl.ID)
}

// ChangeBook keeps the credential-change work that outlives one message:
// the deadlines of pending changes, so that each expiry is recorded
// (m2mguard_changes_total{event="expired"}, change_expired), and the SMS
// sends in progress. nil = this broker's own book in memory: it expires
// the changes it started and retries the SMS it sent, and forgets both at
// a restart. A fleet keeps the book on NATS (package fleetlink): one
// broker at a time sweeps the deadlines of the whole fleet, and takes over
// the SMS sends of a broker that is gone (Hook.ResumeSMS). Its methods run
// on the login path: they must not block.
type ChangeBook interface {
	// Watch records the deadline of sn's pending change rid; Forget drops
	// it (committed, or cancelled by a revocation).
	Watch(sn string, rid codec.ID, deadline time.Time)
	Forget(sn string)
	// Due returns the changes whose deadline has passed at now, and drops
	// them. A fleet's book answers only on the broker that sweeps.
	Due(now time.Time) []DueChange
	// SMSStarted records that this broker sends (and retries) the SMS of
	// change rid of sn, until deadline at the latest; SMSEnded that it is
	// done with it (sent, given up, or the change is no longer pending).
	// A broker that stops in between calls neither: the send is left to
	// the fleet.
	SMSStarted(sn string, rid codec.ID, deadline time.Time)
	SMSEnded(sn string, rid codec.ID)
}

// DueChange is a pending change whose deadline has passed.
type DueChange struct {
	SN  string
	RID codec.ID
}

// localBook is the ChangeBook of a single broker: the change desk's own
// watch, which the desk fills and empties itself.
type localBook struct{ w *changeWatch }

func (b *localBook) Watch(string, codec.ID, time.Time)      {}
func (b *localBook) Forget(string)                          {}
func (b *localBook) Due(now time.Time) []DueChange          { return b.w.due(now) }
func (b *localBook) SMSStarted(string, codec.ID, time.Time) {}
func (b *localBook) SMSEnded(string, codec.ID)              {}

// ResumeSMS takes over the SMS send of change rid of terminal sn from a
// broker of the fleet that is gone (ChangeBook): if the change is still
// pending, active, by SMS and not yet delivered, its text is built again
// from the record and sent, with the usual retries, until its deadline.
// It reports whether it took the send over. Without an SMS gateway it
// takes nothing over.
func (h *Hook) ResumeSMS(ctx context.Context, sn string, rid codec.ID) (bool, error) {
	d := h.changes
	if d.sms == nil {
		return false, nil
	}
	t, err := h.reg.Get(ctx, sn)
	if err != nil {
		return false, err
	}
	ch := t.Pending
	if t.Status != keysvc.StatusActive || ch == nil || ch.RID != rid || ch.Mode != codec.ModeSMS || ch.Delivered ||
		ch.Expired(d.now()) || t.MSISDN == "" {
		return false, nil
	}
	text, err := (&codec.SMS{SN: sn, RID: rid, Params: changeParams(ch)}).Encode()
	if err != nil {
		return false, err
	}
	if !h.crew.spawn(func() { d.sendSMS(sn, t.MSISDN, rid, ch.Deadline, string(text)) }) {
		return false, nil
	}
	d.link.event(slog.LevelInfo, "sms_resumed", "sn", sn, "rid", rid.String())
	return true, nil
}

package hook

import (
	"log/slog"
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Resumed sessions (SECURITY.md, "Sessions stay with their owner"). When a connection resumes a persistent
// session, mochi's inheritClientSession copies the old client's
// subscriptions and messages in flight to the new client, and
// ResendInflightMessages then writes those messages, before the new
// connection's first packet is read and without any ACL check. The ACL
// that admitted them judged the old connection; the new one may be allowed
// less: an application's reach may have been narrowed since, and a
// terminal that must encrypt may have logged in without a session key.
//
// So the hook sieves the inherited state between the two steps, when the
// CONNACK with "session present" is written (OnPacketEncode): by then the
// new client holds all it inherited, anything that reaches it later has
// passed its own ACL, and nothing has been resent yet.
//
//   - Subscriptions and messages outside the new session's reach are
//     dropped, and so from the storage hook (Options.Storage, restore.go).
//   - Downlink data for a connection that must not receive it
//     (withholdsDownlink) is parked in the session object: out of mochi's
//     session, nothing can write it. It goes back into mochi's session
//     when this connection ends (OnDisconnect) or to the connection that
//     takes the session over (OnSessionEstablish, before mochi copies the
//     state), and is sieved again there: a later session with a key
//     receives it, sealed. Parking is a view of the session in memory: the
//     storage hook keeps parked messages (the hook gives them back to it,
//     as mochi's takeover dropped them there), so a restart restores them
//     into the session.
//   - Downlink data for a terminal that logged in with a session key is
//     parked too, until its key message (sk) is written (releaseAfterKey):
//     mochi would resend it right after the CONNACK, before the terminal
//     has subscribed to its key topic and so before it has the key that
//     opens it (SPEC §5 sends sk after that SUBSCRIBE). The terminal
//     would have to hold all of it unread (the reference client holds
//     64 messages); now it holds none of what was queued. Its SUBSCRIBEs
//     no longer meet the session's packet ids in flight either (mochi
//     refuses one whose id is in use with 0x91).

// takeOverParked runs in OnSessionEstablish, before mochi copies the
// session to cl: messages parked by the connection being replaced pass
// to cl's session, to be put back and sieved with the rest of what cl
// inherits. Nothing passes to a clean start, which discards the session.
func (h *Hook) takeOverParked(cl *mqtt.Client, pk packets.Packet) {
	s := h.session(cl)
	old, ok := h.server.Clients.Get(cl.ID)
	if s == nil || !ok || old == cl {
		return
	}
	prev := h.session(old)
	if prev == nil {
		return // its OnDisconnect has put them back into mochi's session
	}
	if msgs := prev.takeParked(); len(msgs) > 0 && !pk.Connect.Clean {
		s.park(msgs)
	}
}

// returnParked puts the session's parked messages back into mochi's
// session of cl, as its connection ends. It holds the park lock while it
// does, so a connection taking the session over at the same moment either
// finds them back in mochi's session, which it is about to copy, or takes
// them itself first and leaves nothing here.
func (h *Hook) returnParked(cl *mqtt.Client, s *session) {
	s.parkMu.Lock()
	defer s.parkMu.Unlock()
	for _, m := range s.parked {
		h.putInflight(cl, m)
	}
	s.parked, s.afterKey = nil, false
}

// releaseAfterKey puts the messages parked until the session key back
// into cl's session and writes them, sealed under that key. The writer
// calls it once the key message is out, on its own goroutine; a write
// blocked for WriteTimeout closes the connection (writeStalled), and what
// is not acknowledged stays in the session for the next connection.
func (h *Hook) releaseAfterKey(cl *mqtt.Client, s *session) {
	s.parkMu.Lock()
	if !s.afterKey {
		s.parkMu.Unlock()
		return
	}
	msgs := s.parked
	s.parked, s.afterKey = nil, false
	put := make([]packets.Packet, 0, len(msgs))
	for _, m := range msgs {
		if m, ok := h.putInflight(cl, m); ok {
			put = append(put, m)
		}
	}
	s.parkMu.Unlock()
	for _, m := range put {
		if cl.Closed() {
			return // the messages are in the session: the next connection gets them
		}
		m.FixedHeader.Dup = true // [MQTT-3.3.1-1], as mochi's resend
		h.writer.write(cl, s, m)
	}
}

func (s *session) park(msgs []packets.Packet) {
	s.parkMu.Lock()
	s.parked = append(s.parked, msgs...)
	s.parkMu.Unlock()
}

func (s *session) takeParked() []packets.Packet {
	s.parkMu.Lock()
	defer s.parkMu.Unlock()
	msgs := s.parked
	s.parked, s.afterKey = nil, false
	return msgs
}

// sieve applies the new session's rules to what cl inherited; present is
// the CONNACK's "session present". It runs in cl's connection goroutine,
// before mochi resends anything.
func (h *Hook) sieve(cl *mqtt.Client, s *session, present bool) {
	msgs := s.takeParked()
	if !present {
		return // a new session: nothing inherited, nothing to keep
	}
	for _, m := range msgs {
		h.putInflight(cl, m)
	}

	subs := 0
	for filter := range cl.State.Subscriptions.GetAll() {
		if inReach, _ := s.receives(filter); !inReach {
			h.unsubscribe(cl, filter)
			subs++
		}
	}
	dropped := 0
	var park, afterKey []packets.Packet
	for _, m := range cl.State.Inflight.GetAll(false) {
		if m.FixedHeader.Type != packets.Publish {
			continue // the acknowledgement state of QoS 2 flows
		}
		// A topic name left empty by an outbound topic alias cannot be
		// checked: it is dropped (the new connection could not resolve
		// the old connection's alias anyway).
		switch inReach, withheld := s.receives(m.TopicName); {
		case !inReach:
			cl.State.Inflight.Delete(m.PacketID)
			h.storeDropped(cl, m)
			dropped++
		case withheld:
			cl.State.Inflight.Delete(m.PacketID)
			park = append(park, m)
		case inReach && s.awaitsKey():
			cl.State.Inflight.Delete(m.PacketID)
			afterKey = append(afterKey, m)
		}
	}
	if len(afterKey) > 0 {
		for _, m := range afterKey {
			h.storeKept(cl, m) // as mochi's resend would have stored it
		}
		s.parkMu.Lock()
		s.parked = append(s.parked, afterKey...)
		s.afterKey = true
		s.parkMu.Unlock()
	}
	if len(park) > 0 {
		for _, m := range park {
			h.storeKept(cl, m)
		}
		s.park(park)
		h.event(slog.LevelInfo, "downlink_withheld", "sn", s.sn, "messages", len(park), "reason", "no-session-key")
	}
	if subs > 0 || dropped > 0 {
		who := []any{"sn", s.sn}
		if s.kind == kindApp {
			who = []any{"app", s.app.Name}
		}
		h.event(slog.LevelWarn, "inherited_state_dropped", append(who, "client_id", cl.ID,
			"subscriptions", subs, "messages", dropped, "reason", "outside-reach")...)
	}
}

// unsubscribe removes one filter of cl's session from mochi's topic index,
// its state and its subscription count, as mochi's UnsubscribeClient does.
func (h *Hook) unsubscribe(cl *mqtt.Client, filter string) {
	cl.State.Subscriptions.Delete(filter)
	if h.server.Topics.Unsubscribe(filter, cl.ID) {
		atomic.AddInt64(&h.server.Info.Subscriptions, -1)
	}
	h.storeUnsubscribed(cl, filter)
}

// putInflight puts a message back into cl's messages in flight, under a
// fresh packet id if its own has been taken meanwhile (mochi keeps one id
// space per session for both directions), and returns it as stored. With
// every id taken it is lost (false), as mochi loses messages then.
func (h *Hook) putInflight(cl *mqtt.Client, m packets.Packet) (packets.Packet, bool) {
	if _, taken := cl.State.Inflight.Get(m.PacketID); taken {
		id, err := cl.NextPacketID()
		if err != nil {
			h.event(slog.LevelWarn, "message_lost", "client_id", cl.ID, "reason", "packet ids exhausted")
			return m, false
		}
		m.PacketID = uint16(id)
		h.storeKept(cl, m)
	}
	cl.State.Inflight.Set(m)
	return m, true
}

package hook

import (
	"cmp"
	"slices"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
)

// Downlink readiness, for whatever delivers downlink data from outside
// mochi's topic tree (a fleet routes it through NATS JetStream, package
// fleetroute): such a deliverer injects each message with server.Publish
// once the terminal's session on this broker can take it, so that it is
// sealed at delivery under that session's key (OnPacketEncode) and kept
// in its MQTT session until acknowledged.
//
// A terminal's session is ready (DownlinkReady) when it is established and
// not ending, its connection may receive downlink data (not
// withholdsDownlink), it has a subscription inside m2m/<sn>/down/#, and,
// if it has a session key, its key message (sk) has been written: the
// terminal cannot open data sealed under a key it does not have yet. The
// hook calls Options.OnDownlinkReady at each moment a session may have
// become ready: established with its subscriptions (a resumed session), a
// SUBSCRIBE inside the downlink filter granted, a key message written.
// Each call is made after the state it reports is visible to
// DownlinkReady, so a deliverer that registers a message first and then
// asks DownlinkReady, and one that drains on OnDownlinkReady, cannot both
// miss it.

// DownlinkReady reports whether terminal sn has a session on this broker
// that is ready to receive downlink data now (see above).
func (h *Hook) DownlinkReady(sn string) bool {
	cl, ok := h.server.Clients.Get(sn)
	if !ok || cl.Closed() {
		return false
	}
	s := h.session(cl)
	return s != nil && h.downlinkReady(cl, s)
}

func (h *Hook) downlinkReady(cl *mqtt.Client, s *session) bool {
	if s.kind != kindTerminal || cl.ID != s.sn || cl.Closed() || s.ending.Load() ||
		s.state.Load() != stateEstablished || s.withholdsDownlink() {
		return false
	}
	if s.hasKey() && !s.keyWritten.Load() {
		return false
	}
	for filter := range cl.State.Subscriptions.GetAll() {
		if filter != s.keyTopic && filterWithin(filter, s.downFilter) {
			return true
		}
	}
	return false
}

// downlinkMaybeReady tells Options.OnDownlinkReady that s may have become
// ready; the callee must not block.
func (h *Hook) downlinkMaybeReady(cl *mqtt.Client, s *session) {
	if h.opts.OnDownlinkReady != nil && h.downlinkReady(cl, s) {
		h.opts.OnDownlinkReady(s.sn)
	}
}

// handDownlinks gives Options.OnDownlinksDiscarded the downlink data of
// cl's MQTT session, which is about to be discarded because its terminal
// moved to another broker: the messages in flight and parked (withheld
// from cl or waiting for its key), oldest first. Each session is handed
// once: OnDisconnect of a taken-over connection, or TakenOver of an
// offline session.
func (h *Hook) handDownlinks(cl *mqtt.Client, parked []packets.Packet) {
	if h.opts.OnDownlinksDiscarded == nil || codec.ValidateSN(cl.ID) != nil {
		return
	}
	msgs := slices.Clone(parked)
	for _, m := range cl.State.Inflight.GetAll(false) {
		if m.FixedHeader.Type != packets.Publish {
			continue
		}
		if kind, sn := codec.ParseTopic(m.TopicName); kind == codec.TopicDown && sn == cl.ID {
			msgs = append(msgs, m)
		}
	}
	if len(msgs) == 0 {
		return
	}
	// mochi's packet ids wrap and its Created has seconds: both order.
	slices.SortStableFunc(msgs, func(a, b packets.Packet) int {
		return cmp.Or(cmp.Compare(a.Created, b.Created), cmp.Compare(a.PacketID, b.PacketID))
	})
	h.opts.OnDownlinksDiscarded(cl.ID, msgs)
}

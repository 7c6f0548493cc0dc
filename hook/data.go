package hook

import (
	"log/slog"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
)

// OnPublish opens the uplink envelopes of terminals with a session key and
// hands the plaintext on to the applications (SPEC section 6). A payload
// that fails is dropped and counted; MaxEnvelopeFailures of them end the
// session. A repeated seq (a QoS 1 redelivery) is acknowledged and dropped.
//
// Drops return packets.CodeSuccessIgnore, never another error: mochi acks
// and drops on it under both protocol versions, whereas ErrRejectPacket
// leaves QoS 1 senders retrying forever and other codes may publish the
// packet anyway under 3.1.1.
func (h *Hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	s := h.session(cl)
	if s == nil || s.kind != kindTerminal {
		return pk, nil
	}
	if s.ending.Load() {
		return pk, packets.CodeSuccessIgnore // the hook is closing the session
	}
	kind, _ := codec.ParseTopic(pk.TopicName)
	switch kind {
	case codec.TopicCtl:
		return h.onControl(cl, s, pk)
	case codec.TopicUp:
		if !s.hasKey() {
			return pk, nil // a terminal without a session key sends plaintext (ACL refused it if it must encrypt)
		}
	default:
		return pk, nil
	}

	aead := s.aead()
	if aead == nil {
		h.envelopeFailed(cl, s, "open")
		return pk, packets.CodeSuccessIgnore
	}
	seq, plain, err := codec.Open(nil, aead, codec.Uplink, pk.TopicName, pk.Payload)
	if err != nil {
		h.envelopeFailed(cl, s, "open")
		return pk, packets.CodeSuccessIgnore
	}
	switch s.upWindow.Check(seq) {
	case codec.Repeated:
		h.metrics.replays.WithLabelValues("envelope").Inc()
		return pk, packets.CodeSuccessIgnore
	case codec.TooOld:
		h.metrics.replays.WithLabelValues("envelope").Inc()
		h.envelopeFailed(cl, s, "too-old")
		return pk, packets.CodeSuccessIgnore
	}
	s.upWindow.Accept(seq)
	s.upTop.Store(s.upWindow.Top())
	pk.Payload = plain
	return pk, nil
}

func (h *Hook) envelopeFailed(cl *mqtt.Client, s *session, reason string) {
	h.metrics.envelopeFailures.WithLabelValues("up", reason).Inc()
	n := s.envFailed.Add(1)
	h.event(slog.LevelWarn, "envelope_refused", "sn", s.sn, "reason", reason, "failures", n)
	if int(n) >= h.opts.MaxEnvelopeFailures {
		h.endSession(cl, s, "envelope-failures", packets.ErrPayloadFormatInvalid)
	}
}

// OnPacketEncode seals downlink data for a terminal with a session key, at
// the moment of delivery and under the key of the session that receives it:
// a message queued while the terminal was offline is sealed for the session
// that finally gets it. Applications publish plaintext.
func (h *Hook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type != packets.Publish {
		return pk
	}
	s := h.session(cl)
	if s == nil || !s.hasKey() {
		return pk
	}
	if kind, sn := codec.ParseTopic(pk.TopicName); kind != codec.TopicDown || sn != s.sn {
		return pk
	}
	aead := s.aead()
	if aead == nil {
		pk.Payload = nil // never plaintext where an envelope is due
		return pk
	}
	seq := s.downSeq.Add(1)
	pk.Payload = codec.Seal(make([]byte, 0, len(pk.Payload)+codec.EnvelopeOverhead), aead, codec.Downlink, seq, pk.TopicName, pk.Payload)
	return pk
}

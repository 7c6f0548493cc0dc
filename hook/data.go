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
		h.changes.onControl(termConn{cl, s}, pk.Payload)
		return pk, packets.CodeSuccessIgnore // acknowledged, never delivered
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
		h.writer.endSession(cl, s, "envelope-failures", packets.ErrPayloadFormatInvalid)
	}
}

// OnPacketEncode seals downlink data for a terminal with a session key, at
// the moment of delivery and under the key of the session that receives it:
// a message queued while the terminal was offline is sealed for the session
// that finally gets it. Applications publish plaintext.
//
// A terminal whose record demands encryption and that has no session key
// receives no downlink data at all (the ACL and the sieve of inherit.go
// keep it away); should any reach this point, it is not written
// (unsendable). The CONNACK of a resumed session is the moment the hook
// sieves what the session inherited (inherit.go).
func (h *Hook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	switch pk.FixedHeader.Type {
	case packets.Publish:
	case packets.Connack:
		if s := h.session(cl); s != nil {
			h.sieve(cl, s, pk.SessionPresent)
		}
		return pk
	default:
		return pk
	}
	s := h.session(cl)
	if s == nil || s.kind != kindTerminal {
		return pk
	}
	if kind, sn := codec.ParseTopic(pk.TopicName); kind != codec.TopicDown || sn != s.sn {
		return pk
	}
	if !s.hasKey() {
		if s.requireEnc {
			return h.unsendable(s, pk, "no-key")
		}
		return pk // a terminal that may exchange plaintext (SPEC section 6)
	}
	aead := s.aead()
	if aead == nil {
		return h.unsendable(s, pk, "no-aead")
	}
	seq := s.downSeq.Add(1)
	pk.Payload = codec.Seal(make([]byte, 0, len(pk.Payload)+codec.EnvelopeOverhead), aead, codec.Downlink, seq, pk.TopicName, pk.Payload)
	return pk
}

// unsendable makes mochi discard a downlink packet that must not be
// written in plaintext: it declares the packet larger than the connection
// accepts, and mochi's WritePacket discards a packet over the client's
// maximum packet size after encoding it, as MQTT 5 requires
// ([MQTT-3.1.2-24]). A message in flight stays there, for the next session.
func (h *Hook) unsendable(s *session, pk packets.Packet, reason string) packets.Packet {
	h.metrics.envelopeFailures.WithLabelValues("down", reason).Inc()
	h.event(slog.LevelWarn, "downlink_unsendable", "sn", s.sn, "reason", reason)
	pk.Payload = nil // never plaintext where an envelope is due, even if written
	pk.Mods.MaxSize = 1
	return pk
}

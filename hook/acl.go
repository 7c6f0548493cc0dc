package hook

import (
	"log/slog"
	"strings"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/m2mguard/m2mguard/codec"
)

// OnACLCheck enforces SPEC section 4. mochi calls it with a topic filter on
// SUBSCRIBE, with a topic name on PUBLISH and again with the topic name for
// every recipient of a message, so it is in memory and allocation-free.
//
//   - A terminal may publish on m2m/<sn>/up/... (unless its record demands
//     encryption and it has no session key) and $m2m/<sn>/ctl, and subscribe
//     to $m2m/<sn>/key and filters inside m2m/<sn>/down/#. Nothing else.
//   - An application may publish and subscribe inside its configured reach
//     (by default m2m/+/down/# and m2m/+/up/#), never on a $ topic: a wider
//     filter such as "#" is refused at SUBSCRIBE, and every delivery is
//     checked again per recipient.
//   - Only the platform writes on $m2m/<sn>/key.
func (h *Hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	s := h.session(cl)
	if s == nil {
		v, ok := h.offline.Load(cl.ID) // a message queued for a persistent session
		if !ok || !cl.Closed() {
			return false
		}
		s = v.(*session)
	}
	if s.kind == kindTerminal {
		return s.terminalMay(topic, write)
	}
	return s.appMay(topic, write)
}

func (s *session) terminalMay(topic string, write bool) bool {
	if !write && hasWildcard(topic) {
		return filterWithin(topic, s.downFilter)
	}
	kind, sn := codec.ParseTopic(topic)
	if sn != s.sn {
		return false
	}
	if write {
		return kind == codec.TopicCtl || (kind == codec.TopicUp && (s.hasKey() || !s.requireEnc))
	}
	return kind == codec.TopicKey || kind == codec.TopicDown
}

func (s *session) appMay(topic string, write bool) bool {
	if strings.HasPrefix(topic, "$") {
		return false
	}
	reach := s.app.Subscribe
	if write {
		reach = s.app.Publish
	}
	wildcard := hasWildcard(topic)
	for _, f := range reach {
		if wildcard && filterWithin(topic, f) || !wildcard && matchTopic(f, topic) {
			return true
		}
	}
	return false
}

func (h *Hook) willAllowed(s *session, topic string) bool {
	if s.kind == kindTerminal {
		// A will is sent without passing OnPublish: it could not be an
		// envelope, so a terminal that must encrypt may not have one.
		kind, sn := codec.ParseTopic(topic)
		return sn == s.sn && kind == codec.TopicUp && !s.requireEnc
	}
	return s.appMay(topic, true)
}

// OnWill checks the will topic when the will is sent (mochi never runs the
// ACL on wills). A forbidden will is emptied: an empty topic has no
// subscribers and is not retained.
func (h *Hook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	s := h.session(cl)
	if s == nil || !h.willAllowed(s, will.TopicName) {
		h.event(slog.LevelWarn, "will_refused", "sn", s.snOrEmpty())
		return mqtt.Will{}, nil
	}
	return will, nil
}

func (s *session) snOrEmpty() string {
	if s == nil {
		return ""
	}
	return s.sn
}

package hook

import (
	"log/slog"
	"strings"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/m2mguard/m2mguard/codec"
	appevents "github.com/m2mguard/m2mguard/events"
)

// OnACLCheck enforces SPEC section 4. mochi calls it with a topic filter on
// SUBSCRIBE, with a topic name on PUBLISH and again with the topic name for
// every recipient of a message, so it is in memory and allocation-free.
//
//   - A terminal may publish on m2m/<sn>/up/... (unless its record demands
//     encryption and it has no session key) and $m2m/<sn>/ctl, and subscribe
//     to $m2m/<sn>/key and filters inside m2m/<sn>/down/# — the latter only
//     while it may receive downlink data (withholdsDownlink), and every
//     delivery of downlink data is checked the same way. Nothing else.
//   - An application may publish and subscribe inside its configured reach
//     (by default m2m/+/down/# and m2m/+/up/#), never on a $ topic but the
//     event topics $m2m/events/<sn>/<kind>, which it may receive (never
//     publish) if its subscribe reach has a filter under $m2m/events/: a
//     wider filter such as "#" is refused at SUBSCRIBE, and every
//     delivery is checked again per recipient.
//   - Only the platform writes on $m2m/<sn>/key.
//
// What a resumed session inherits is sieved by the same rules (inherit.go).
func (h *Hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	s := h.session(cl)
	if s == nil {
		// a message to be queued for a persistent session whose connection is gone
		if s = h.offlineIdentity(cl); s == nil {
			return false
		}
	}
	if write {
		if s.kind == kindTerminal {
			return s.terminalMayPublish(topic)
		}
		return s.appMay(topic, true)
	}
	inReach, withheld := s.receives(topic)
	return inReach && !withheld
}

// receives classifies what the session would receive on topic (a name, or
// a filter on SUBSCRIBE): whether it is inside the reach of the session's
// identity, and whether this connection must nonetheless not receive it
// (downlink data while withholdsDownlink).
func (s *session) receives(topic string) (inReach, withheld bool) {
	if s.kind != kindTerminal {
		return s.appMay(topic, false), false
	}
	var down bool
	if hasWildcard(topic) {
		inReach, down = filterWithin(topic, s.downFilter), true
	} else {
		kind, sn := codec.ParseTopic(topic)
		down = kind == codec.TopicDown
		inReach = sn == s.sn && (down || kind == codec.TopicKey)
	}
	return inReach, inReach && down && s.withholdsDownlink()
}

func (s *session) terminalMayPublish(topic string) bool {
	kind, sn := codec.ParseTopic(topic)
	if sn != s.sn {
		return false
	}
	return kind == codec.TopicCtl || (kind == codec.TopicUp && (s.hasKey() || !s.requireEnc))
}

func (s *session) appMay(topic string, write bool) bool {
	eventTopic := false
	if strings.HasPrefix(topic, "$") {
		if write || !eventReach(topic) {
			return false
		}
		eventTopic = true
	}
	reach := s.app.Subscribe
	if write {
		reach = s.app.Publish
	}
	wildcard := hasWildcard(topic)
	for _, f := range reach {
		if eventTopic && !appevents.IsFilter(f) {
			continue // only a filter granted for events reaches them ($ filters of old records reach nothing)
		}
		if wildcard && filterWithin(topic, f) || !wildcard && matchTopic(f, topic) {
			return true
		}
	}
	return false
}

// eventReach reports whether an application may receive a $ topic at all:
// a filter under $m2m/events/ (on SUBSCRIBE), or an event topic name,
// $m2m/events/<sn>/<kind> (per recipient). Nothing else under $ reaches
// an application, whatever its reach says: not a terminal's key or
// control topic, even that of a terminal called "events" (whose
// $m2m/events/key a filter $m2m/events/# covers; its key messages are
// written to its connection, never published, and this refuses them
// anyway).
func eventReach(topic string) bool {
	if hasWildcard(topic) {
		return appevents.IsFilter(topic)
	}
	_, _, ok := appevents.ParseTopic(topic)
	return ok
}

// willAllowed reports whether the session may leave a will on topic.
func (s *session) willAllowed(topic string) bool {
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
	if s == nil || !s.willAllowed(will.TopicName) {
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

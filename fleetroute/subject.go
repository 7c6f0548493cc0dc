package fleetroute

import (
	"errors"
	"fmt"
	"strings"

	"github.com/m2mguard/m2mguard/fleet"
)

// ErrSubject is wrapped by the errors of TopicSubject and SubjectTopic.
var ErrSubject = errors.New("fleetroute: subject")

// MaxSubject is the longest subject TopicSubject produces (bytes): well
// inside NATS's 4 KiB control line, with room for the headers' line.
const MaxSubject = 2048

// emptyLevel is the token of an empty MQTT topic level. fleet.EscapeKey
// never produces it: it escapes '_' itself, so every '_' it writes is
// followed by two hex digits.
const emptyLevel = "_"

// TopicSubject turns an MQTT topic name into a NATS subject under prefix
// (which ends with '.'), reversibly: every level of the topic becomes one
// token, escaped with fleet.EscapeKey (ASCII letters, digits and '-' stay,
// every other byte is '_' and two upper-case hex digits), and an empty
// level becomes the token "_". So "m2m/A1/up/t/x.y" is
// prefix+"m2m.A1.up.t.x_2Ey", and no topic yields a wildcard token or an
// empty one. A topic whose subject would be longer than MaxSubject is
// refused.
func TopicSubject(prefix, topic string) (string, error) {
	var b strings.Builder
	b.Grow(len(prefix) + len(topic) + 8)
	b.WriteString(prefix)
	for i, level := range strings.Split(topic, "/") {
		if i > 0 {
			b.WriteByte('.')
		}
		if level == "" {
			b.WriteString(emptyLevel)
		} else {
			tok, err := fleet.EscapeKey(level)
			if err != nil {
				return "", fmt.Errorf("%w: topic level: %w", ErrSubject, err)
			}
			b.WriteString(tok)
		}
		if b.Len() > MaxSubject {
			return "", fmt.Errorf("%w: topic too long for a subject", ErrSubject)
		}
	}
	return b.String(), nil
}

// SubjectTopic reverses TopicSubject: it refuses a subject without prefix,
// longer than MaxSubject, or with a token TopicSubject cannot have written,
// so that every subject stands for one topic.
func SubjectTopic(prefix, subject string) (string, error) {
	if len(subject) > MaxSubject {
		return "", fmt.Errorf("%w: too long", ErrSubject)
	}
	rest, ok := strings.CutPrefix(subject, prefix)
	if !ok || rest == "" {
		return "", fmt.Errorf("%w: not under %q", ErrSubject, prefix)
	}
	var b strings.Builder
	b.Grow(len(rest))
	for i, tok := range strings.Split(rest, ".") {
		if i > 0 {
			b.WriteByte('/')
		}
		if tok == emptyLevel {
			continue
		}
		level, err := fleet.UnescapeKey(tok)
		if err != nil {
			return "", fmt.Errorf("%w: token: %w", ErrSubject, err)
		}
		// A token stands for one level: an escaped "/" in it would
		// make two, whose subject is another one.
		if level == "" || strings.Contains(level, "/") {
			return "", fmt.Errorf("%w: token %q is not one topic level", ErrSubject, tok)
		}
		b.WriteString(level)
	}
	return b.String(), nil
}

package hook

import "strings"

// matchTopic reports whether the topic name matches the filter, with the
// MQTT rule that a filter starting with a wildcard does not match a topic
// starting with '$'. It does not allocate.
func matchTopic(filter, topic string) bool {
	if strings.HasPrefix(topic, "$") && (strings.HasPrefix(filter, "+") || strings.HasPrefix(filter, "#")) {
		return false
	}
	for {
		f, fRest, fMore := strings.Cut(filter, "/")
		if f == "#" {
			return true
		}
		t, tRest, tMore := strings.Cut(topic, "/")
		if f != "+" && f != t {
			return false
		}
		if !fMore || !tMore {
			// "a/#" matches "a": the filter may end in one more "#" level.
			return fMore == tMore || (!tMore && fRest == "#")
		}
		filter, topic = fRest, tRest
	}
}

// filterWithin reports whether every topic that filter matches is also
// matched by reach, i.e. whether a subscription to filter stays inside
// reach. It does not allocate.
func filterWithin(filter, reach string) bool {
	if (strings.HasPrefix(reach, "+") || strings.HasPrefix(reach, "#")) && strings.HasPrefix(filter, "$") {
		return false
	}
	for {
		r, rRest, rMore := strings.Cut(reach, "/")
		if r == "#" {
			return true
		}
		f, fRest, fMore := strings.Cut(filter, "/")
		switch {
		case f == "#":
			return false // reach is narrower than "anything below"
		case r == "+":
			// any single level, '+' included, stays inside '+'
		case f == "+" || f != r:
			return false
		}
		if !fMore || !rMore {
			return fMore == rMore || (!fMore && rRest == "#")
		}
		filter, reach = fRest, rRest
	}
}

// hasWildcard reports whether s is a filter rather than a topic name.
func hasWildcard(s string) bool { return strings.ContainsAny(s, "+#") }

// validFilter reports whether s is a well-formed MQTT topic filter: not
// empty, '#' only as the whole last level, '+' only as a whole level.
func validFilter(s string) bool {
	if s == "" {
		return false
	}
	for {
		level, rest, more := strings.Cut(s, "/")
		if strings.ContainsAny(level, "+#") && len(level) != 1 {
			return false
		}
		if level == "#" && more {
			return false
		}
		if !more {
			return true
		}
		s = rest
	}
}

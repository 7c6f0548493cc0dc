package codec

import "strings"

// KeyTopic is $m2m/<sn>/key: platform → terminal control messages.
func KeyTopic(sn string) string { return "$m2m/" + sn + "/key" }

// CtlTopic is $m2m/<sn>/ctl: terminal → platform control messages.
func CtlTopic(sn string) string { return "$m2m/" + sn + "/ctl" }

// UpTopic is m2m/<sn>/up/<sub>: terminal data to applications.
func UpTopic(sn, sub string) string { return "m2m/" + sn + "/up/" + sub }

// DownTopic is m2m/<sn>/down/<sub>: application data to a terminal.
func DownTopic(sn, sub string) string { return "m2m/" + sn + "/down/" + sub }

// TopicKind classifies a topic name of SPEC section 4.
type TopicKind uint8

// The kinds of topic a terminal's traffic uses.
const (
	TopicOther TopicKind = iota // not an M2M1 topic
	TopicUp                     // m2m/<sn>/up/<anything>
	TopicDown                   // m2m/<sn>/down/<anything>
	TopicKey                    // $m2m/<sn>/key
	TopicCtl                    // $m2m/<sn>/ctl
)

// ParseTopic classifies a topic name (not a filter) and returns the serial
// number it belongs to. It does not allocate. A data topic needs at least
// one level after up/ or down/ ("m2m/<sn>/up/" with an empty level counts,
// as MQTT allows empty levels).
func ParseTopic(topic string) (TopicKind, string) {
	if rest, ok := strings.CutPrefix(topic, "$m2m/"); ok {
		sn, tail, ok := strings.Cut(rest, "/")
		if !ok || ValidateSN(sn) != nil {
			return TopicOther, ""
		}
		switch tail {
		case "key":
			return TopicKey, sn
		case "ctl":
			return TopicCtl, sn
		}
		return TopicOther, ""
	}
	rest, ok := strings.CutPrefix(topic, "m2m/")
	if !ok {
		return TopicOther, ""
	}
	sn, tail, ok := strings.Cut(rest, "/")
	if !ok || ValidateSN(sn) != nil {
		return TopicOther, ""
	}
	if strings.HasPrefix(tail, "up/") {
		return TopicUp, sn
	}
	if strings.HasPrefix(tail, "down/") {
		return TopicDown, sn
	}
	return TopicOther, ""
}

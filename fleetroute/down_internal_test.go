package fleetroute

import (
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/m2mguard/m2mguard/codec"
)

// FuzzDecodeDownlink: a stored downlink's headers are accepted only for
// a downlink topic of the subject's own terminal and a QoS of 0 to 2.
func FuzzDecodeDownlink(f *testing.F) {
	f.Add("A1", "m2m/A1/down/cmd", "1", "1")
	f.Add("A1", "m2m/B2/down/cmd", "0", "")
	f.Add("A1", "m2m/A1/up/t", "2", "0")
	f.Add("A1", "$m2m/A1/key", "1", "")
	f.Add("A1", "m2m/A1/down/cmd", "3", "")
	f.Add("A1", "m2m/A1/down/cmd", "-1", "")
	f.Fuzz(func(t *testing.T, sn, topic, qos, retain string) {
		h := nats.Header{}
		h.Set(downHdrTopic, topic)
		h.Set(downHdrQoS, qos)
		h.Set(downHdrRetain, retain)
		gotTopic, q, r, ok := decodeDownlink(sn, h)
		if !ok {
			return
		}
		if kind, tsn := codec.ParseTopic(gotTopic); kind != codec.TopicDown || tsn != sn {
			t.Fatalf("accepted %q for %q", gotTopic, sn)
		}
		if q > 2 || r != (retain == "1") {
			t.Fatalf("qos %d retain %v from %q %q", q, r, qos, retain)
		}
	})
}

// TestQueueFull recognises JetStream's refusal of a full subject, also
// wrapped, and only that.
func TestQueueFull(t *testing.T) {
	full := &jetstream.APIError{Code: 503, ErrorCode: 10077, Description: "maximum messages per subject exceeded"}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{full, true},
		{fmt.Errorf("publish: %w", full), true},
		{&jetstream.APIError{Code: 503, ErrorCode: 10077, Description: "maximum messages exceeded"}, false},
		{nats.ErrTimeout, false},
	} {
		if got := queueFull(tc.err); got != tc.want {
			t.Errorf("queueFull(%v) = %v", tc.err, got)
		}
	}
}

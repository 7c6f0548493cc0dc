package rawmqtt

import (
	"bufio"
	"bytes"
	"strings"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestRoundTrip: what Encode writes, Read reads back.
func TestRoundTrip(t *testing.T) {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 4,
		PacketID: 7, TopicName: "m2m/S1/up/temp", Payload: []byte("21.5")}
	var buf bytes.Buffer
	if err := Encode(&buf, &pk); err != nil {
		t.Fatal(err)
	}
	got, err := Read(bufio.NewReader(&buf), 4, 0)
	if err != nil || got.TopicName != pk.TopicName || string(got.Payload) != "21.5" || got.PacketID != 7 {
		t.Fatalf("read back %+v, %v", got, err)
	}
	if err := Encode(&buf, &packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}}); err == nil {
		t.Fatal("a CONNACK encoded: a client never sends one")
	}
}

// TestReadBound: a packet over the bound is refused unread.
func TestReadBound(t *testing.T) {
	_, err := Read(bufio.NewReader(bytes.NewReader([]byte{0x30, 0x80, 0x80, 0x08})), 4, 1<<16) // 128 KiB
	if err == nil || !strings.Contains(err.Error(), "packet of 131072 bytes, at most 65536") {
		t.Fatalf("a 128 KiB packet under a 64 KiB bound: %v", err)
	}
}

// FuzzRead: Read never panics on what a broker (or anything) sends, for
// both protocol versions.
func FuzzRead(f *testing.F) {
	f.Add([]byte{0x20, 0x02, 0x00, 0x00})
	f.Add([]byte{0x90, 0x03, 0x00, 0x01, 0x01})
	f.Add([]byte{0x30, 0x06, 0x00, 0x01, 'a', 'x', 'y', 'z'})
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, v := range []byte{4, 5} {
			r := bufio.NewReader(bytes.NewReader(data))
			for range 4 {
				if _, err := Read(r, v, 1<<16); err != nil {
					break
				}
			}
		}
	})
}

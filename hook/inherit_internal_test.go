package hook

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

// TestUnsendableDownlinkIsNotWritten: the last line of defence of
// OnPacketEncode. Downlink data that reaches the encoder for a terminal
// that must encrypt and has no session key is not written at all by
// mochi's WritePacket (and would carry no payload if it were); for a
// terminal that may exchange plaintext it is written as it is.
func TestUnsendableDownlinkIsNotWritten(t *testing.T) {
	store, err := boltstore.Open(filepath.Join(t.TempDir(), "db"), boltstore.Options{MasterKey: bytes.Repeat([]byte{1}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	svc, err := keysvc.New(keysvc.Options{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	server := mqtt.New(&mqtt.Options{InlineClient: true})
	h, err := New(Options{Registry: svc, Server: server, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := server.AddHook(h, nil); err != nil {
		t.Fatal(err)
	}
	const sn = "A00MS8011390002S"
	for _, requireEnc := range []bool{true, false} {
		conn, peer := net.Pipe()
		cl := server.NewClient(conn, "tcp", sn, false)
		cl.Properties.ProtocolVersion = 5
		h.sessions.Store(cl, &session{kind: kindTerminal, sn: sn, requireEnc: requireEnc})
		written := make(chan []byte)
		go func() {
			b, _ := io.ReadAll(peer)
			written <- b
		}()
		err := cl.WritePacket(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 1,
			TopicName: "m2m/" + sn + "/down/cmd", Payload: []byte("reboot"),
		})
		conn.Close()
		got := <-written
		h.sessions.Delete(cl)
		if requireEnc {
			if !errors.Is(err, packets.ErrPacketTooLarge) || len(got) != 0 {
				t.Errorf("must encrypt, no key: WritePacket = %v and %d bytes written, want ErrPacketTooLarge and none", err, len(got))
			}
			continue
		}
		if err != nil || !bytes.Contains(got, []byte("reboot")) {
			t.Errorf("may exchange plaintext: WritePacket = %v, written %q", err, got)
		}
	}
	mfs, err := h.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var failures float64
	for _, mf := range mfs {
		if mf.GetName() == "m2mguard_envelope_failures_total" {
			for _, m := range mf.GetMetric() {
				failures += m.GetCounter().GetValue() // only direction="down", reason="no-key" is counted here
			}
		}
	}
	if failures != 1 {
		t.Errorf("envelope failures: %v, want 1 (down, no-key)", failures)
	}
}

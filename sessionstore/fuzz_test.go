package sessionstore

import (
	"bytes"
	"testing"
)

// FuzzRecord feeds arbitrary bytes to what the store reads from its file:
// the opening of a sealed value (anything not sealed by the store fails,
// nothing panics, a value opens only at the key it was sealed for) and the
// decoders of the records a value may hold.
func FuzzRecord(f *testing.F) {
	f.Add([]byte(`{"client":{"id":"S1","protocolVersion":4},"disconnected":1700000000}`))
	f.Add([]byte(`{"client":"S1","filter":"m2m/S1/down/#","qos":1}`))
	f.Add([]byte(`{"payload":"aGk=","client":"S1","topic_name":"m2m/S1/down/cmd","fixedheader":{"type":3,"qos":1},"packet_id":7}`))
	f.Add([]byte{})
	f.Add(bytes.Repeat([]byte{0}, 40))
	s, err := newSealer(bytes.Repeat([]byte{7}, MasterKeySize))
	if err != nil {
		f.Fatal(err)
	}
	key := s.clientKey("S1")
	f.Fuzz(func(t *testing.T, data []byte) {
		if _, err := s.open(bucketClients, key, data); err == nil {
			t.Fatal("arbitrary bytes opened as a sealed value")
		}
		sealed := s.seal(bucketClients, key, data)
		pt, err := s.open(bucketClients, key, sealed)
		if err != nil || !bytes.Equal(pt, data) {
			t.Fatalf("seal then open: %v", err)
		}
		if _, err := s.open(bucketInflight, key, sealed); err == nil {
			t.Fatal("a value opened in another bucket")
		}
		if _, err := s.open(bucketClients, s.clientKey("S2"), sealed); err == nil {
			t.Fatal("a value opened at another key")
		}
		if r, err := decodeClient(data); err == nil && r.Client.ID == "" {
			t.Fatal("a client record without a ClientID decoded")
		}
		if m, err := decodeSubscription(data); err == nil && (m.Filter == "" || m.Qos > 2) {
			t.Fatal("an invalid subscription decoded")
		}
		if m, err := decodeMessage(data); err == nil && m.FixedHeader.Qos > 2 {
			t.Fatal("a message with QoS > 2 decoded")
		}
	})
}

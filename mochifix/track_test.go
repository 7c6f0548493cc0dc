package mochifix

import (
	"net"
	"testing"
)

// TestTrackCountsUntilRead: a connection Track's listener accepted counts
// as pending until it is first read from or closed, once.
func TestTrackCountsUntilRead(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tl := Track(ln)
	defer tl.Close()
	for _, step := range []struct {
		name string
		done func(c net.Conn)
	}{
		{"read", func(c net.Conn) { c.Read(make([]byte, 1)); c.Close() }},
		{"closed unread", func(c net.Conn) { c.Close(); c.Close() }},
	} {
		peer, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		peer.Write([]byte{0x10})
		c, err := tl.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if n := tl.pending.Load(); n != 1 {
			t.Fatalf("%s: %d pending after Accept, want 1", step.name, n)
		}
		step.done(c)
		if n := tl.pending.Load(); n != 0 {
			t.Fatalf("%s: %d pending after it, want 0", step.name, n)
		}
		peer.Close()
	}
}

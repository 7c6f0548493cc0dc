package tcptap_test

import (
	"io"
	"net"
	"testing"

	"github.com/m2mguard/m2mguard/internal/syncbuf"
	"github.com/m2mguard/m2mguard/internal/tcptap"
)

// TestTapSeesServerBytes: a client talks to an echo server through the
// tap, and the tap's down function sees what the server wrote.
func TestTapSeesServerBytes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c) // echo
	}()
	var seen syncbuf.Buffer
	addr := tcptap.Start(t, ln.Addr().String(), func(dst io.Writer, src io.Reader) {
		io.Copy(io.MultiWriter(&seen, dst), src) // seen first: the client's read follows it
	})
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "hello" {
		t.Fatalf("client read %q, %v", got, err)
	}
	if seen.String() != "hello" {
		t.Fatalf("the tap saw %q", seen.String())
	}
}

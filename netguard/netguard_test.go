package netguard_test

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/netguard"
)

// serve accepts on l and keeps every connection open, reading until it ends.
func serve(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() { io.Copy(io.Discard, c); c.Close() }()
	}
}

// closedWithin reports whether the server closes c within wait.
func closedWithin(c net.Conn, wait time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(wait))
	_, err := c.Read(make([]byte, 1))
	ne, timeout := err.(net.Error)
	return err != nil && !(timeout && ne.Timeout())
}

func TestSlowLorisClosed(t *testing.T) {
	inner, _ := net.Listen("tcp", "127.0.0.1:0")
	l := netguard.Wrap(inner, netguard.Options{ConnectTimeout: 100 * time.Millisecond})
	defer l.Close()
	go serve(l)
	c, err := net.Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte{0x10}) // the first byte of a CONNECT, and then nothing
	if !closedWithin(c, 5*time.Second) {
		t.Fatal("a client that never completes its CONNECT keeps its connection")
	}
}

func TestPerAddrLimit(t *testing.T) {
	inner, _ := net.Listen("tcp", "127.0.0.1:0")
	var refused []string
	l := netguard.Wrap(inner, netguard.Options{MaxPerAddr: 3, ConnectTimeout: time.Minute,
		OnRefuse: func(addr, reason string) { refused = append(refused, addr+" "+reason) }})
	defer l.Close()
	go serve(l)
	var conns []net.Conn
	for i := 0; i < 4; i++ {
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	if !closedWithin(conns[3], 5*time.Second) {
		t.Fatal("the connection over the per-address limit was kept")
	}
	if closedWithin(conns[0], 100*time.Millisecond) {
		t.Fatal("a connection within the limit was closed")
	}
	// Another address is not affected.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	other, err := d.Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if closedWithin(other, 100*time.Millisecond) {
		t.Fatal("another address was refused")
	}
	// A slot is freed when a connection closes.
	conns[0].Close()
	for deadline := time.Now().Add(5 * time.Second); l.Open() > 3; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("closed connection not released")
		}
	}
	again, _ := net.Dial("tcp", inner.Addr().String())
	defer again.Close()
	if closedWithin(again, 100*time.Millisecond) {
		t.Fatal("a freed slot was not reused")
	}
	if l.Refused() != 1 || len(refused) != 1 || refused[0] != "127.0.0.1 per-addr" {
		t.Fatalf("refused %d %v", l.Refused(), refused)
	}
}

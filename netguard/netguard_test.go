package netguard_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/testwait"
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

// listen returns a loopback listener guarded by g, closed at the end of t.
func listen(t *testing.T, g *netguard.Guard) net.Listener {
	t.Helper()
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := g.Wrap(inner)
	t.Cleanup(func() { l.Close() })
	return l
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// closedWithin reports whether the server closes c within wait.
func closedWithin(c net.Conn, wait time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(wait))
	_, err := c.Read(make([]byte, 1))
	return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

func TestSlowLorisClosed(t *testing.T) {
	l := listen(t, netguard.New(netguard.Options{ConnectTimeout: 100 * time.Millisecond}))
	go serve(l)
	c := dial(t, l.Addr().String())
	c.Write([]byte{0x10}) // the first byte of a CONNECT, and then nothing
	if !closedWithin(c, 5*time.Second) {
		t.Fatal("a client that never completes its CONNECT keeps its connection")
	}
}

func TestPerAddrLimit(t *testing.T) {
	var mu sync.Mutex
	var refused []string
	g := netguard.New(netguard.Options{MaxPerAddr: 3, ConnectTimeout: time.Minute,
		OnRefuse: func(addr, reason string) { mu.Lock(); refused = append(refused, addr+" "+reason); mu.Unlock() }})
	l := listen(t, g)
	go serve(l)
	var conns []net.Conn
	for i := 0; i < 4; i++ {
		conns = append(conns, dial(t, l.Addr().String()))
	}
	if !closedWithin(conns[3], 5*time.Second) {
		t.Fatal("the connection over the per-address limit was kept")
	}
	if closedWithin(conns[0], 100*time.Millisecond) {
		t.Fatal("a connection within the limit was closed")
	}
	// Another address is not affected.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	other, err := d.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if closedWithin(other, 100*time.Millisecond) {
		t.Fatal("another address was refused")
	}
	// A slot is freed when a connection closes.
	conns[0].Close()
	testwait.For(t, 10*time.Second, "the closed connection's slot", func() bool { return g.Stats().Open == 3 })
	again := dial(t, l.Addr().String())
	if closedWithin(again, 100*time.Millisecond) {
		t.Fatal("a freed slot was not reused")
	}
	mu.Lock()
	defer mu.Unlock()
	if s := g.Stats(); s.RefusedPerAddr != 1 || s.RefusedTotal != 0 || len(refused) != 1 || refused[0] != "127.0.0.1 per-addr" {
		t.Fatalf("stats %+v, refused %v", s, refused)
	}
}

// TestLimitsSharedAcrossListeners: one Guard wrapping several listeners
// counts their connections together, per address and in all.
func TestLimitsSharedAcrossListeners(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opts   netguard.Options
		reason string
	}{
		{"per address", netguard.Options{MaxPerAddr: 2}, netguard.ReasonPerAddr},
		{"in all", netguard.Options{MaxConns: 2}, netguard.ReasonTotal},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var reasons []string
			tc.opts.OnRefuse = func(_, reason string) { mu.Lock(); reasons = append(reasons, reason); mu.Unlock() }
			g := netguard.New(tc.opts)
			a, b := listen(t, g), listen(t, g)
			go serve(a)
			go serve(b)
			dial(t, a.Addr().String())
			dial(t, b.Addr().String())
			testwait.For(t, 10*time.Second, "two open connections", func() bool { return g.Stats().Open == 2 })
			if !closedWithin(dial(t, a.Addr().String()), 5*time.Second) || !closedWithin(dial(t, b.Addr().String()), 5*time.Second) {
				t.Fatal("a third connection was kept on one of the listeners")
			}
			// OnRefuse runs after the refused socket is closed: wait for it.
			refused := func() string { mu.Lock(); defer mu.Unlock(); return fmt.Sprint(reasons) }
			want := fmt.Sprint([]string{tc.reason, tc.reason})
			testwait.For(t, 10*time.Second, "two refusals "+tc.reason, func() bool { return refused() == want })
		})
	}
}

// acceptOne returns the server side of one connection to l.
func acceptOne(t *testing.T, l net.Listener) (server, client net.Conn) {
	t.Helper()
	got := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			close(got)
			return
		}
		got <- c
	}()
	client = dial(t, l.Addr().String())
	server, ok := <-got
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { server.Close() })
	return server, client
}

// fill writes to c until a write fails and returns that error.
func fill(c net.Conn) error {
	chunk := make([]byte, 64<<10)
	for {
		if _, err := c.Write(chunk); err != nil {
			return err
		}
	}
}

// TestWriteTimeoutClosesConn: a peer that never reads makes a write time
// out, and the connection is closed and its slot released — also when the
// user of the connection clears the deadline the way mochi's keepalive 0
// does, and when it does so while the write is blocked.
func TestWriteTimeoutClosesConn(t *testing.T) {
	for _, tc := range []struct {
		name  string
		touch func(c net.Conn) // what the connection's user does meanwhile
	}{
		{"untouched", func(net.Conn) {}},
		{"deadline cleared first", func(c net.Conn) { c.SetDeadline(time.Time{}) }},
		{"deadline cleared while blocked", func(c net.Conn) {
			go func() {
				for i := 0; i < 50; i++ {
					c.SetDeadline(time.Time{})
					c.SetWriteDeadline(time.Time{})
					time.Sleep(2 * time.Millisecond)
				}
			}()
		}},
		{"later deadline", func(c net.Conn) { c.SetDeadline(time.Now().Add(time.Hour)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var timeouts []string
			var mu sync.Mutex
			g := netguard.New(netguard.Options{WriteTimeout: 200 * time.Millisecond,
				OnWriteTimeout: func(addr string) { mu.Lock(); timeouts = append(timeouts, addr); mu.Unlock() }})
			server, _ := acceptOne(t, listen(t, g)) // the client never reads
			tc.touch(server)
			done := make(chan error, 1)
			go func() { done <- fill(server) }()
			select {
			case err := <-done:
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("write failed with %v, want a deadline error", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("a write to a peer that does not read is still blocked")
			}
			if _, err := server.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
				t.Fatalf("after the timeout the connection is not closed: read %v", err)
			}
			mu.Lock()
			defer mu.Unlock()
			if s := g.Stats(); s.Open != 0 || s.WriteTimeouts != 1 || len(timeouts) != 1 || timeouts[0] != "127.0.0.1" {
				t.Fatalf("stats %+v, timeouts %v", s, timeouts)
			}
		})
	}
}

// TestEarlierWriteDeadlineCutsWrite: a write deadline set while a write is
// blocked, earlier than the write timeout, ends the write.
func TestEarlierWriteDeadlineCutsWrite(t *testing.T) {
	g := netguard.New(netguard.Options{WriteTimeout: time.Hour})
	server, _ := acceptOne(t, listen(t, g))
	done := make(chan error, 1)
	go func() { done <- fill(server) }()
	cut := time.NewTicker(20 * time.Millisecond) // until the writer is blocked and sees it
	defer cut.Stop()
	giveUp := time.After(30 * time.Second)
	for {
		select {
		case err := <-done:
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("write failed with %v", err)
			}
			return
		case <-cut.C:
			server.SetWriteDeadline(time.Now())
		case <-giveUp:
			t.Fatal("an earlier write deadline did not end the blocked write")
		}
	}
}

// TestWriteOK: writes to a reading peer pass, and Close releases the slot
// once however often it is called.
func TestWriteOK(t *testing.T) {
	g := netguard.New(netguard.Options{WriteTimeout: time.Second})
	server, client := acceptOne(t, listen(t, g))
	go io.Copy(io.Discard, client)
	for i := 0; i < 100; i++ {
		if _, err := server.Write(make([]byte, 64<<10)); err != nil {
			t.Fatal(err)
		}
	}
	server.Close()
	server.Close()
	if s := g.Stats(); s.Open != 0 || s.WriteTimeouts != 0 {
		t.Fatalf("stats %+v", s)
	}
}

func TestZeroOptions(t *testing.T) {
	o := netguard.New(netguard.Options{}).Options()
	if o.ConnectTimeout != netguard.DefaultConnectTimeout || o.WriteTimeout != netguard.DefaultWriteTimeout ||
		o.MaxPerAddr != netguard.DefaultMaxPerAddr || o.MaxConns != 0 {
		t.Fatalf("defaults %+v", o)
	}
}

func ExampleGuard() {
	// One Guard for every listener of a broker: the limits count them together.
	g := netguard.New(netguard.Options{MaxPerAddr: 64, MaxConns: 10000})
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	l := g.Wrap(inner) // hand l to mochi: listeners.NewNet("tcp", l)
	defer l.Close()
	fmt.Println(g.Stats().Open, g.Options().ConnectTimeout)
	// Output: 0 10s
}

// BenchmarkWrite compares 1 KiB writes to a reading peer on a plain and on
// a guarded connection (the guard sets the write deadline every time).
func BenchmarkWrite(b *testing.B) {
	for _, guarded := range []bool{false, true} {
		b.Run(fmt.Sprintf("guarded=%v", guarded), func(b *testing.B) {
			inner, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			var l net.Listener = inner
			if guarded {
				l = netguard.New(netguard.Options{}).Wrap(inner)
			}
			defer l.Close()
			got := make(chan net.Conn, 1)
			go func() { c, _ := l.Accept(); got <- c }()
			client, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			defer client.Close()
			go io.Copy(io.Discard, client)
			server := <-got
			defer server.Close()
			p := make([]byte, 1024)
			b.SetBytes(int64(len(p)))
			b.ResetTimer()
			for range b.N {
				if _, err := server.Write(p); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

package netguard_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/netguard"
)

var loopback = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}

// header returns the PROXY header (version 1 or 2) of a TCP connection
// from client to 127.0.0.1:1883.
func header(t testing.TB, version byte, client string) []byte {
	t.Helper()
	src, err := net.ResolveTCPAddr("tcp", client)
	if err != nil {
		t.Fatal(err)
	}
	h, err := proxyproto.HeaderProxyFromAddrs(version, src, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1883}).Format()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// dialFrom connects to addr from the loopback address from and writes p.
func dialFrom(t *testing.T, from, addr string, p []byte) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 10 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if len(p) > 0 {
		if _, err := c.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// served is what the server side of a connection saw: its RemoteAddr, and
// the bytes it read until the connection ended or want bytes arrived.
type served struct {
	remote string
	data   []byte
	err    error
}

// acceptor accepts on l and reads every connection on a goroutine of its
// own (as mochi does), reporting each on the returned channel; the test's
// cleanup closes l and waits for all of them.
func acceptor(t *testing.T, l net.Listener, want int) <-chan served {
	t.Helper()
	out := make(chan served, 64)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open = append(open, c)
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				s := served{remote: c.RemoteAddr().String()} // first, as mochi's NewClient does
				buf := make([]byte, want)
				n, err := io.ReadFull(c, buf)
				s.data, s.err = buf[:n], err
				out <- s
			})
		}
	})
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return out
}

func next(t *testing.T, ch <-chan served) served {
	t.Helper()
	select {
	case s := <-ch:
		return s
	case <-time.After(15 * time.Second):
		t.Fatal("no connection served within 15 s")
		return served{}
	}
}

// TestProxyHeaderNamesClient: behind a trusted proxy, the connection's
// RemoteAddr is the client the header names (v2 IPv4 and IPv6, v1), and
// the bytes after the header, sent in the same segment, arrive intact.
func TestProxyHeaderNamesClient(t *testing.T) {
	payload := []byte("\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00") // a CONNECT
	for _, tc := range []struct {
		name    string
		version byte
		client  string
	}{
		{"v2 IPv4", 2, "127.0.0.2:50000"},
		{"v2 IPv6", 2, "[2001:db8::7]:50001"},
		{"v1 IPv4", 1, "127.0.0.3:50002"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := netguard.New(netguard.Options{TrustedProxies: loopback})
			l := listen(t, g)
			ch := acceptor(t, l, len(payload))
			dialFrom(t, "127.0.0.1", l.Addr().String(), append(header(t, tc.version, tc.client), payload...))
			s := next(t, ch)
			if s.remote != tc.client || s.err != nil || !bytes.Equal(s.data, payload) {
				t.Fatalf("served %s: % x, %v; want %s: % x", s.remote, s.data, s.err, tc.client, payload)
			}
			if st := g.Stats(); st.Proxied != 1 || st.RefusedProxyInvalid != 0 || st.RefusedProxyUntrusted != 0 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

// TestProxyHeaderRefused: every way a PROXY header is refused closes the
// connection, counts it and reports the reason; Read wraps ErrRefused (or
// is the I/O error of a peer that said nothing); no slot is left behind.
func TestProxyHeaderRefused(t *testing.T) {
	local, _ := (&proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}).Format()
	udp, _ := proxyproto.HeaderProxyFromAddrs(2, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 5}, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 6}).Format()
	v2 := header(t, 2, "127.0.0.9:1000")
	for _, tc := range []struct {
		name   string
		from   string
		send   []byte
		closeW bool   // the client closes its side after sending
		reason string // "" = not refused by the guard
	}{
		{"untrusted v2", "127.0.0.2", append(v2, 0x10), false, netguard.ReasonProxyUntrusted},
		{"untrusted v1", "127.0.0.2", []byte("PROXY TCP4 127.0.0.9 127.0.0.1 1000 1883\r\n\x10"), false, netguard.ReasonProxyUntrusted},
		{"untrusted LOCAL", "127.0.0.2", local, false, netguard.ReasonProxyUntrusted},
		{"untrusted truncated v2", "127.0.0.2", v2[:14], true, netguard.ReasonProxyUntrusted},
		{"trusted without a header", "127.0.0.1", []byte("\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"), false, netguard.ReasonProxyInvalid},
		{"trusted truncated v2", "127.0.0.1", v2[:20], true, netguard.ReasonProxyInvalid},
		{"trusted garbage v1", "127.0.0.1", []byte("PROXY TCP4 nonsense\r\n"), false, netguard.ReasonProxyInvalid},
		{"trusted UDP source", "127.0.0.1", udp, false, netguard.ReasonProxyInvalid},
		{"trusted silent", "127.0.0.1", nil, false, netguard.ReasonProxyInvalid},
		{"untrusted silent", "127.0.0.2", nil, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var reasons []string
			g := netguard.New(netguard.Options{TrustedProxies: loopback, ConnectTimeout: 300 * time.Millisecond,
				OnRefuse: func(addr, reason string) { mu.Lock(); reasons = append(reasons, addr+" "+reason); mu.Unlock() }})
			l := listen(t, g)
			ch := acceptor(t, l, 1)
			c := dialFrom(t, tc.from, l.Addr().String(), tc.send)
			if tc.closeW {
				c.(*net.TCPConn).CloseWrite()
			}
			s := next(t, ch)
			if tc.reason == "" {
				if s.err == nil || errors.Is(s.err, netguard.ErrRefused) {
					t.Fatalf("read %v, want the deadline's error", s.err)
				}
			} else if !errors.Is(s.err, netguard.ErrRefused) || len(s.data) != 0 {
				t.Fatalf("read % x, %v; want nothing and ErrRefused", s.data, s.err)
			}
			if !closedWithin(c, 5*time.Second) {
				t.Fatal("the refused connection is still open")
			}
			testwait.For(t, 10*time.Second, "the slot released", func() bool { return g.Stats().Open == 0 })
			mu.Lock()
			defer mu.Unlock()
			want := []string{}
			if tc.reason != "" {
				want = []string{tc.from + " " + tc.reason}
			}
			if fmt.Sprint(reasons) != fmt.Sprint(want) {
				t.Fatalf("refusals %v, want %v", reasons, want)
			}
			st := g.Stats()
			if got := st.RefusedProxyUntrusted + st.RefusedProxyInvalid; got != int64(len(want)) || st.Proxied != 0 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

// TestProxyLocalIsTheProxys: a LOCAL header (the proxy's health check)
// keeps the proxy's own address and counts against it.
func TestProxyLocalIsTheProxys(t *testing.T) {
	local, err := (&proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}).Format()
	if err != nil {
		t.Fatal(err)
	}
	g := netguard.New(netguard.Options{TrustedProxies: loopback, MaxPerAddr: 1})
	l := listen(t, g)
	ch := acceptor(t, l, 1)
	first := dialFrom(t, "127.0.0.1", l.Addr().String(), local)
	testwait.For(t, 10*time.Second, "the LOCAL connection counted", func() bool { return g.Stats().ProxyLocal == 1 })
	// The proxy's own address is counted: a second LOCAL connection is over
	// MaxPerAddr 1 while the first is open.
	second := dialFrom(t, "127.0.0.1", l.Addr().String(), local)
	if s := next(t, ch); !errors.Is(s.err, netguard.ErrRefused) {
		t.Fatalf("second LOCAL connection: %+v, want refused", s)
	}
	if !closedWithin(second, 5*time.Second) {
		t.Fatal("a second LOCAL connection over the proxy's limit is open")
	}
	first.Write([]byte("x"))
	if s := next(t, ch); s.err != nil || string(s.data) != "x" || s.remote[:10] != "127.0.0.1:" {
		t.Fatalf("served %+v", s)
	}
	if st := g.Stats(); st.ProxyLocal != 1 || st.Proxied != 0 || st.RefusedPerAddr != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// TestProxyPerAddrCountsClient: MaxPerAddr counts the client the header
// names; the proxy itself may forward more than MaxPerAddr connections.
func TestProxyPerAddrCountsClient(t *testing.T) {
	var mu sync.Mutex
	var reasons []string
	g := netguard.New(netguard.Options{TrustedProxies: loopback, MaxPerAddr: 1, ConnectTimeout: time.Minute,
		OnRefuse: func(addr, reason string) { mu.Lock(); reasons = append(reasons, addr+" "+reason); mu.Unlock() }})
	l := listen(t, g)
	ch := acceptor(t, l, 1)
	for i, client := range []string{"127.0.0.2:1", "127.0.0.3:1", "127.0.0.4:1"} {
		dialFrom(t, "127.0.0.1", l.Addr().String(), header(t, 2, client))
		testwait.For(t, 10*time.Second, "the connection counted", func() bool { return g.Stats().Open == i+1 })
	}
	over := dialFrom(t, "127.0.0.1", l.Addr().String(), header(t, 2, "127.0.0.3:2"))
	if s := next(t, ch); !errors.Is(s.err, netguard.ErrRefused) || s.remote != "127.0.0.3:2" {
		t.Fatalf("second connection of 127.0.0.3: %+v, want refused", s)
	}
	if !closedWithin(over, 5*time.Second) {
		t.Fatal("the connection over the client's limit is open")
	}
	testwait.For(t, 10*time.Second, "three open", func() bool { return g.Stats().Open == 3 })
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(reasons) != "[127.0.0.3 per-addr]" || g.Stats().RefusedPerAddr != 1 {
		t.Fatalf("refusals %v, stats %+v", reasons, g.Stats())
	}
}

// TestSilentProxyDoesNotBlockAccept: a trusted proxy's connection that
// sends nothing holds only its own goroutine; Accept serves the next
// connection long before the silent one's header deadline.
func TestSilentProxyDoesNotBlockAccept(t *testing.T) {
	g := netguard.New(netguard.Options{TrustedProxies: loopback, ConnectTimeout: time.Hour})
	l := listen(t, g)
	ch := acceptor(t, l, 1)
	for range 8 {
		dialFrom(t, "127.0.0.1", l.Addr().String(), nil) // silent
	}
	testwait.For(t, 10*time.Second, "the silent connections accepted", func() bool { return g.Stats().Open == 8 })
	dialFrom(t, "127.0.0.1", l.Addr().String(), append(header(t, 2, "127.0.0.2:7"), 'x'))
	if s := next(t, ch); s.remote != "127.0.0.2:7" || string(s.data) != "x" {
		t.Fatalf("served %+v behind 8 silent proxy connections", s)
	}
}

// TestProxyOffReadsNothing: without trusted proxies the guard reads
// nothing: a PROXY header is just bytes, and RemoteAddr is the socket's.
func TestProxyOffReadsNothing(t *testing.T) {
	g := netguard.New(netguard.Options{})
	l := listen(t, g)
	h := header(t, 2, "127.0.0.9:1")
	ch := acceptor(t, l, len(h))
	dialFrom(t, "127.0.0.1", l.Addr().String(), h)
	if s := next(t, ch); !bytes.Equal(s.data, h) || s.remote[:10] != "127.0.0.1:" {
		t.Fatalf("served %+v", s)
	}
}

func TestParsePrefixes(t *testing.T) {
	for _, tc := range []struct {
		in, want string // want "" = error
	}{
		{"", "[]"},
		{"10.0.0.0/8", "[10.0.0.0/8]"},
		{" 10.1.2.3/8 , 192.0.2.7\t2001:db8::1/32,", "[10.0.0.0/8 192.0.2.7/32 2001:db8::/32]"},
		{"::ffff:192.0.2.0/120", "[192.0.2.0/24]"},
		{"::ffff:192.0.2.9", "[192.0.2.9/32]"},
		{"2001:db8::5", "[2001:db8::5/128]"},
		{"10.0.0.0/33", ""},
		{"fe80::1%eth0", ""},
		{"::ffff:0.0.0.0/80", ""},
		{"example.com", ""},
		{"10.0.0.0/8;11.0.0.0/8", ""},
	} {
		got, err := netguard.ParsePrefixes(tc.in)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("ParsePrefixes(%q) = %v, want an error", tc.in, got)
		case tc.want != "" && (err != nil || fmt.Sprint(got) != tc.want):
			t.Errorf("ParsePrefixes(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

// FuzzParsePrefixes: whatever parses is a list of valid, masked prefixes
// that parse back to themselves.
func FuzzParsePrefixes(f *testing.F) {
	for _, s := range []string{"10.0.0.0/8", "192.0.2.7, 2001:db8::/32", "::ffff:1.2.3.4/120", "fe80::1%x", "1.2.3.4/", ",,"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ps, err := netguard.ParsePrefixes(s)
		if err != nil {
			return
		}
		for _, p := range ps {
			if !p.IsValid() || p != p.Masked() || p.Addr().Is4In6() {
				t.Fatalf("%q: prefix %v", s, p)
			}
			again, err := netguard.ParsePrefixes(p.String())
			if err != nil || len(again) != 1 || again[0] != p {
				t.Fatalf("%q: %v does not parse back: %v %v", s, p, again, err)
			}
		}
	})
}

// pipeListener hands out the server ends of in-memory connections whose
// peer address is remote.
type pipeListener struct {
	conns chan net.Conn
}

func (l *pipeListener) Accept() (net.Conn, error) {
	c, ok := <-l.conns
	if !ok {
		return nil, net.ErrClosed
	}
	return c, nil
}
func (l *pipeListener) Close() error   { return nil }
func (l *pipeListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1883} }

type addrConn struct {
	net.Conn
	remote net.Addr
}

func (c addrConn) RemoteAddr() net.Addr { return c.remote }

// FuzzProxyHandshake feeds arbitrary bytes to a guarded connection from a
// trusted proxy and from an untrusted address. Nothing panics; the slot is
// always given back; a connection that is not refused reads exactly the
// bytes after the header (untrusted: all of them), and the guard refuses
// any untrusted connection that opens with a PROXY signature.
func FuzzProxyHandshake(f *testing.F) {
	f.Add(header(f, 2, "127.0.0.2:1"), true)
	f.Add(header(f, 1, "[2001:db8::1]:1"), true)
	f.Add(append(header(f, 2, "127.0.0.2:1"), "\x10\x00"...), false)
	f.Add([]byte("\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"), false)
	f.Add([]byte("PROXY UNKNOWN\r\nGET / HTTP/1.1\r\n"), true)
	f.Add([]byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"), true)
	f.Fuzz(func(t *testing.T, data []byte, trusted bool) {
		g := netguard.New(netguard.Options{TrustedProxies: loopback, ConnectTimeout: 2 * time.Second})
		pl := &pipeListener{conns: make(chan net.Conn, 1)}
		l := g.Wrap(pl)
		server, client := net.Pipe()
		from := net.IPv4(127, 0, 0, 2)
		if trusted {
			from = net.IPv4(127, 0, 0, 1)
		}
		pl.conns <- addrConn{server, &net.TCPAddr{IP: from, Port: 4000}}
		c, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Go(func() { client.Write(data); client.Close() })
		got, err := io.ReadAll(c)
		c.Close()
		wg.Wait()
		if g.Stats().Open != 0 {
			t.Fatalf("slot not released: %+v", g.Stats())
		}
		refused := errors.Is(err, netguard.ErrRefused)
		hdr, herr := proxyproto.Read(bufioReader(data))
		switch {
		case !trusted && !refused && (bytes.HasPrefix(data, proxyproto.SIGV2) || bytes.HasPrefix(data, []byte("PROXY"))):
			t.Fatalf("untrusted connection opening with a signature served: % x", data)
		case !trusted && !refused && !bytes.Equal(got, data):
			t.Fatalf("untrusted: read % x, sent % x", got, data)
		case trusted && !refused && (herr != nil || hdr == nil):
			t.Fatalf("trusted connection without a valid header served: % x (%v)", data, herr)
		case trusted && !refused && !bytes.HasSuffix(data, got):
			t.Fatalf("trusted: read % x, not the end of % x", got, data)
		}
	})
}

func bufioReader(b []byte) *bufio.Reader { return bufio.NewReaderSize(bytes.NewReader(b), 256) }

func ExampleParsePrefixes() {
	trusted, err := netguard.ParsePrefixes("10.0.0.0/8, 192.0.2.7")
	if err != nil {
		panic(err)
	}
	// Connections from 10.x.x.x and 192.0.2.7 must start with a PROXY
	// header; the guard counts and reports the client address it names.
	g := netguard.New(netguard.Options{TrustedProxies: trusted})
	fmt.Println(g.Options().TrustedProxies)
	// Output: [10.0.0.0/8 192.0.2.7/32]
}

// TestCloseEndsPendingHandshakes: closing the listener closes the
// connections still waiting for their PROXY header (mochi does not know
// them yet), so their goroutines end now, not at the CONNECT deadline.
func TestCloseEndsPendingHandshakes(t *testing.T) {
	g := netguard.New(netguard.Options{TrustedProxies: loopback, ConnectTimeout: time.Hour})
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := g.Wrap(inner)
	ch := acceptor(t, l, 1)
	for range 3 {
		dialFrom(t, "127.0.0.1", l.Addr().String(), nil) // silent
	}
	testwait.For(t, 10*time.Second, "three pending connections", func() bool { return g.Stats().Open == 3 })
	l.Close()
	for range 3 {
		if s := next(t, ch); s.err == nil {
			t.Fatalf("served %+v after Close", s)
		}
	}
	testwait.For(t, 10*time.Second, "the slots released", func() bool { return g.Stats().Open == 0 })
	if st := g.Stats(); st.RefusedProxyInvalid != 0 {
		t.Fatalf("connections closed by the listener counted as refused: %+v", st)
	}
}

// BenchmarkAcceptAndFirstRead measures a connection's way through the
// guard to its first byte: PROXY protocol off, from a trusted proxy with a
// v2 header, and from an untrusted address while the protocol is on.
func BenchmarkAcceptAndFirstRead(b *testing.B) {
	hdr := header(b, 2, "127.0.0.2:1")
	for _, tc := range []struct {
		name    string
		trusted []netip.Prefix
		send    []byte
	}{
		{"off", nil, []byte{0x10}},
		{"trusted v2", loopback, append(hdr, 0x10)},
		{"untrusted", []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, []byte{0x10}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			g := netguard.New(netguard.Options{TrustedProxies: tc.trusted})
			pl := &pipeListener{conns: make(chan net.Conn, 1)}
			l := g.Wrap(pl)
			buf := make([]byte, 1)
			b.ReportAllocs()
			for range b.N {
				server, client := net.Pipe()
				pl.conns <- addrConn{server, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 4000}}
				c, err := l.Accept()
				if err != nil {
					b.Fatal(err)
				}
				done := make(chan struct{})
				go func() { client.Write(tc.send); close(done) }()
				c.RemoteAddr()
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
				<-done
				c.Close()
				client.Close()
			}
		})
	}
}

// Package netguard guards the broker's listeners against connection floods,
// slow-loris clients and clients that stop reading, none of which mochi-mqtt
// v2.7.9 bounds: it sets no read deadline before CONNECT, no limit per
// source address, and its writes block as long as the peer does not read.
//
// One Guard counts the connections of every listener it wraps, so that the
// limits hold for the broker as a whole (TCP, TLS and WebSocket together):
//
//   - MaxPerAddr connections from one IP address and MaxConns in all; a
//     connection over a limit is closed at once, before a byte is read.
//   - ConnectTimeout: a new connection gets a read deadline by which its
//     CONNECT must arrive (mochi replaces it with the keepalive deadline
//     once the CONNECT is read).
//   - WriteTimeout: every Write must finish within it, and a connection
//     whose write fails (a timeout included) is closed: after a partial
//     write the MQTT stream is corrupt, and mochi ignores write errors.
//   - TrustedProxies: connections from these networks (load balancers)
//     must start with a PROXY protocol header (v2, or v1), read within the
//     CONNECT deadline; the connection's RemoteAddr is then the client's
//     address the header names, and the per-address limit counts that
//     address. A PROXY header from any other address is refused. See
//     proxy.go.
//
// Accept also outlives a temporary accept error: mochi's listener loop
// ends on any error Accept returns, so that a process out of file
// descriptors (EMFILE) would never accept again. The guard's Accept
// retries instead, backing off from 5 ms to 1 s (as net/http.Server does),
// and returns only when the listener is closed or the error is permanent.
// See accept.go.
package netguard

import (
	"bufio"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// The defaults of the zero Options (DefaultOptions).
const (
	DefaultConnectTimeout = 10 * time.Second
	DefaultWriteTimeout   = 10 * time.Second
	DefaultMaxPerAddr     = 256
)

// DefaultOptions returns the options New gives the zero Options: the
// defaults above, no total limit, no callbacks.
func DefaultOptions() Options {
	return Options{ConnectTimeout: DefaultConnectTimeout, WriteTimeout: DefaultWriteTimeout, MaxPerAddr: DefaultMaxPerAddr}
}

// Refusal reasons, as passed to Options.OnRefuse.
const (
	ReasonPerAddr = "per-addr"
	ReasonTotal   = "total"
	// ReasonProxyUntrusted: a PROXY header from an address outside
	// TrustedProxies (or bytes that begin like one).
	ReasonProxyUntrusted = "proxy-untrusted"
	// ReasonProxyInvalid: a connection from a trusted proxy without a
	// valid PROXY header within the CONNECT deadline.
	ReasonProxyInvalid = "proxy-invalid"
)

// ErrRefused is wrapped by the error that Read and Write return on a
// connection the guard accepted and then refused: one whose PROXY header
// was refused, or whose client address, named by the header, is over the
// per-address limit. The guard has closed it.
var ErrRefused = errors.New("netguard: connection refused")

// Options configure a Guard. The zero value is useful: the defaults above
// and no total limit.
type Options struct {
	ConnectTimeout time.Duration // 0 = DefaultConnectTimeout
	WriteTimeout   time.Duration // 0 = DefaultWriteTimeout
	MaxPerAddr     int           // open connections from one IP address; 0 = DefaultMaxPerAddr
	MaxConns       int           // open connections in all; 0 = no limit

	// TrustedProxies are the networks of the load balancers that put a
	// PROXY protocol header (v2 or v1) before every connection they
	// forward. A connection from them must start with one, and counts
	// (MaxPerAddr) and reports (RemoteAddr) the client address it names;
	// a connection from anywhere else that starts with one is refused.
	// Empty: the PROXY protocol is off and the guard reads nothing.
	TrustedProxies []netip.Prefix

	// OnRefuse, if set, is called for every connection refused, with the
	// remote IP address and one of the Reason constants. For
	// ReasonPerAddr after a PROXY header, the address is the client's.
	OnRefuse func(addr, reason string)
	// OnWriteTimeout, if set, is called for every connection closed
	// because a write did not finish within WriteTimeout.
	OnWriteTimeout func(addr string)
	// OnAcceptError, if set, is called for every temporary accept error
	// (EMFILE and the like: see Temporary) with the time Accept now waits
	// before it tries again. It is called from Accept: it must not block,
	// and should rate-limit any log line, for in a flood it is called up
	// to once a second per listener, continuously.
	OnAcceptError func(err error, delay time.Duration)
}

// Stats are a Guard's counters.
type Stats struct {
	Open           int   // connections open now
	RefusedPerAddr int64 // connections refused by MaxPerAddr
	RefusedTotal   int64 // connections refused by MaxConns
	WriteTimeouts  int64 // connections closed on a write timeout

	Proxied               int64 // connections whose client address a trusted proxy's header named
	ProxyLocal            int64 // trusted proxies' own connections (LOCAL command: health checks)
	RefusedProxyUntrusted int64 // connections refused for a PROXY header from an untrusted address
	RefusedProxyInvalid   int64 // trusted proxies' connections refused for a missing or invalid header

	AcceptErrors int64 // temporary accept errors (out of file descriptors, ...), each retried after a pause
}

// Guard holds the limits and the counts of every listener it wraps.
type Guard struct {
	opts Options

	mu    sync.Mutex
	perIP map[string]int
	total int

	refusedPerAddr atomic.Int64
	refusedTotal   atomic.Int64
	writeTimeouts  atomic.Int64
	proxied        atomic.Int64
	proxyLocal     atomic.Int64
	refusedProxyU  atomic.Int64
	refusedProxyI  atomic.Int64
	acceptErrors   atomic.Int64
}

// New returns a Guard with opts.
func New(opts Options) *Guard {
	def := DefaultOptions()
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = def.ConnectTimeout
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = def.WriteTimeout
	}
	if opts.MaxPerAddr <= 0 {
		opts.MaxPerAddr = def.MaxPerAddr
	}
	return &Guard{opts: opts, perIP: map[string]int{}}
}

// Options returns the options in effect (defaults filled in).
func (g *Guard) Options() Options { return g.opts }

// Wrap returns l guarded by g. Close the returned listener to close l.
func (g *Guard) Wrap(l net.Listener) *Listener {
	return &Listener{Listener: l, g: g, done: make(chan struct{})}
}

// Stats returns the counters.
func (g *Guard) Stats() Stats {
	g.mu.Lock()
	open := g.total
	g.mu.Unlock()
	return Stats{Open: open, RefusedPerAddr: g.refusedPerAddr.Load(), RefusedTotal: g.refusedTotal.Load(),
		WriteTimeouts: g.writeTimeouts.Load(), Proxied: g.proxied.Load(), ProxyLocal: g.proxyLocal.Load(),
		RefusedProxyUntrusted: g.refusedProxyU.Load(), RefusedProxyInvalid: g.refusedProxyI.Load(),
		AcceptErrors: g.acceptErrors.Load()}
}

// admit takes a slot for a connection from ip, or says which limit it is
// over. ip "" (a trusted proxy's connection whose header is still to
// come) takes a slot of the total only.
func (g *Guard) admit(ip string) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case ip != "" && g.perIP[ip] >= g.opts.MaxPerAddr:
		return ReasonPerAddr
	case g.opts.MaxConns > 0 && g.total >= g.opts.MaxConns:
		return ReasonTotal
	}
	if ip != "" {
		g.perIP[ip]++
	}
	g.total++
	return ""
}

// assign counts a connection admitted with ip "" against ip, the address
// its PROXY header named, or says it is over MaxPerAddr (it then still
// holds its slot of the total, which release("") gives back).
func (g *Guard) assign(ip string) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.perIP[ip] >= g.opts.MaxPerAddr {
		return ReasonPerAddr
	}
	g.perIP[ip]++
	return ""
}

func (g *Guard) release(ip string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if ip != "" {
		if g.perIP[ip]--; g.perIP[ip] <= 0 {
			delete(g.perIP, ip)
		}
	}
	g.total--
}

func (g *Guard) refused(ip, reason string) {
	switch reason {
	case ReasonPerAddr:
		g.refusedPerAddr.Add(1)
	case ReasonTotal:
		g.refusedTotal.Add(1)
	case ReasonProxyUntrusted:
		g.refusedProxyU.Add(1)
	case ReasonProxyInvalid:
		g.refusedProxyI.Add(1)
	}
	if g.opts.OnRefuse != nil {
		g.opts.OnRefuse(ip, reason)
	}
}

// Listener is a net.Listener guarded by a Guard.
type Listener struct {
	net.Listener
	g *Guard

	mu      sync.Mutex
	closed  bool
	pending map[*conn]struct{} // connections whose PROXY header is still to be read
	done    chan struct{}      // closed by Close: ends an Accept's pause after an error
}

// Close closes the listener and the connections it accepted whose PROXY
// header has not been read yet, so that their goroutines end now rather
// than at the CONNECT deadline (mochi knows of no connection before its
// CONNECT, and so cannot close them at shutdown).
func (l *Listener) Close() error {
	err := l.Listener.Close()
	l.mu.Lock()
	if !l.closed {
		close(l.done)
	}
	l.closed = true
	pending := l.pending
	l.pending = nil
	l.mu.Unlock()
	for c := range pending {
		c.Close()
	}
	return err
}

// track records c as waiting for its header; false if l is closed.
func (l *Listener) track(c *conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	if l.pending == nil {
		l.pending = map[*conn]struct{}{}
	}
	l.pending[c] = struct{}{}
	return true
}

func (l *Listener) untrack(c *conn) {
	l.mu.Lock()
	delete(l.pending, c)
	l.mu.Unlock()
}

// Accept returns the next connection within the limits, with the CONNECT
// deadline set. Connections over a limit are closed without a byte. After
// a temporary error (Temporary) it pauses and tries again; it returns an
// error only once l is closed (net.ErrClosed) or for a permanent one.
//
// Accept reads nothing: a PROXY header is read by the connection itself,
// on its first Read, Write, RemoteAddr or LocalAddr (mochi and net/http
// call RemoteAddr first, in the connection's own goroutine), so a slow or
// silent proxy connection holds only its own goroutine. Until its header
// names the client, a trusted proxy's connection counts against MaxConns
// only.
func (l *Listener) Accept() (net.Conn, error) {
	var delay time.Duration // the pause after the last temporary error
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if delay, err = l.backOff(err, delay); err != nil {
				return nil, err
			}
			continue
		}
		delay = 0
		ip := hostOf(c.RemoteAddr())
		mode := l.g.proxyMode(c.RemoteAddr())
		counted := ip
		if mode == proxyRequired {
			counted = "" // the header names the address to count
		}
		if reason := l.g.admit(counted); reason != "" {
			c.Close()
			l.g.refused(ip, reason)
			continue
		}
		gc := &conn{Conn: c, g: l.g, ip: counted, proxy: mode}
		if mode != proxyOff {
			gc.l = l
			if !l.track(gc) {
				gc.Close()
				return nil, net.ErrClosed
			}
		}
		gc.SetDeadline(time.Now().Add(l.g.opts.ConnectTimeout))
		return gc, nil
	}
}

func hostOf(a net.Addr) string {
	if tcp, ok := a.(*net.TCPAddr); ok {
		return tcp.IP.String()
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return host
}

// conn is a guarded connection. It releases its slot once, on the first
// Close, and owns the write deadline: every Write is bounded by the earlier
// of WriteTimeout from its start and the deadline its user set, so that a
// user clearing the deadline (mochi does, for keepalive 0, from its read
// goroutine while another goroutine writes) never unbounds a write.
//
// With the PROXY protocol on, it first reads the header (handshake, in
// proxy.go); br then holds the bytes read past it, and remote the
// client's address.
type conn struct {
	net.Conn
	g *Guard

	slotMu   sync.Mutex // guards ip and released
	ip       string     // the address counted against MaxPerAddr; "" = none (yet)
	released bool

	proxy  proxyMode
	l      *Listener // the listener tracking c until its header is read
	hsOnce sync.Once
	hsErr  error
	br     *bufio.Reader // bytes read past the header; nil once drained (read goroutine only)
	remote net.Addr      // the client's address, if a header named one

	mu    sync.Mutex // guards the two deadlines and the calls that set them
	user  time.Time  // the write deadline the user asked for; zero = none
	armed time.Time  // the write deadline in force on the socket
}

// Read reads the connection's bytes, after its PROXY header if it has one.
func (c *conn) Read(p []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	if c.br != nil {
		if c.br.Buffered() > 0 {
			return c.br.Read(p) // only what is buffered: never blocks
		}
		c.br = nil
	}
	return c.Conn.Read(p)
}

// RemoteAddr returns the client's address: the one a trusted proxy's
// header named, else the socket's peer.
func (c *conn) RemoteAddr() net.Addr {
	c.handshake()
	if c.remote != nil {
		return c.remote
	}
	return c.Conn.RemoteAddr()
}

// LocalAddr returns the socket's local address (after the handshake, so
// that no caller sees the connection before its header is checked).
func (c *conn) LocalAddr() net.Addr {
	c.handshake()
	return c.Conn.LocalAddr()
}

// Write writes p within the write deadline and closes the connection if
// the write fails.
func (c *conn) Write(p []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	c.mu.Lock()
	d := time.Now().Add(c.g.opts.WriteTimeout)
	if !c.user.IsZero() && c.user.Before(d) {
		d = c.user
	}
	c.armed = d
	err := c.Conn.SetWriteDeadline(d)
	c.mu.Unlock()
	if err != nil {
		c.Close()
		return 0, err
	}
	n, err := c.Conn.Write(p)
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			c.g.writeTimeouts.Add(1)
			if c.g.opts.OnWriteTimeout != nil {
				c.g.opts.OnWriteTimeout(hostOf(c.RemoteAddr()))
			}
		}
		c.Close()
	}
	return n, err
}

// SetWriteDeadline records t for the following writes; an earlier t also
// cuts short a write in progress. A zero t leaves WriteTimeout alone in force.
func (c *conn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.user = t
	if !t.IsZero() && t.Before(c.armed) {
		c.armed = t
		return c.Conn.SetWriteDeadline(t)
	}
	return nil
}

// SetDeadline sets the read deadline and records the write deadline (see
// SetWriteDeadline).
func (c *conn) SetDeadline(t time.Time) error {
	return errors.Join(c.Conn.SetReadDeadline(t), c.SetWriteDeadline(t))
}

// Close closes the connection and gives its slot back (once).
func (c *conn) Close() error {
	c.slotMu.Lock()
	if !c.released {
		c.released = true
		c.g.release(c.ip)
	}
	c.slotMu.Unlock()
	return c.Conn.Close()
}

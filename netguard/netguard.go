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
package netguard

import (
	"errors"
	"net"
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
)

// Options configure a Guard. The zero value is useful: the defaults above
// and no total limit.
type Options struct {
	ConnectTimeout time.Duration // 0 = DefaultConnectTimeout
	WriteTimeout   time.Duration // 0 = DefaultWriteTimeout
	MaxPerAddr     int           // open connections from one IP address; 0 = DefaultMaxPerAddr
	MaxConns       int           // open connections in all; 0 = no limit

	// OnRefuse, if set, is called for every connection refused, with the
	// remote IP address and ReasonPerAddr or ReasonTotal.
	OnRefuse func(addr, reason string)
	// OnWriteTimeout, if set, is called for every connection closed
	// because a write did not finish within WriteTimeout.
	OnWriteTimeout func(addr string)
}

// Stats are a Guard's counters.
type Stats struct {
	Open           int   // connections open now
	RefusedPerAddr int64 // connections refused by MaxPerAddr
	RefusedTotal   int64 // connections refused by MaxConns
	WriteTimeouts  int64 // connections closed on a write timeout
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
	return &Listener{Listener: l, g: g}
}

// Stats returns the counters.
func (g *Guard) Stats() Stats {
	g.mu.Lock()
	open := g.total
	g.mu.Unlock()
	return Stats{Open: open, RefusedPerAddr: g.refusedPerAddr.Load(), RefusedTotal: g.refusedTotal.Load(),
		WriteTimeouts: g.writeTimeouts.Load()}
}

func (g *Guard) admit(ip string) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case g.perIP[ip] >= g.opts.MaxPerAddr:
		return ReasonPerAddr
	case g.opts.MaxConns > 0 && g.total >= g.opts.MaxConns:
		return ReasonTotal
	}
	g.perIP[ip]++
	g.total++
	return ""
}

func (g *Guard) release(ip string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.perIP[ip]--; g.perIP[ip] <= 0 {
		delete(g.perIP, ip)
	}
	g.total--
}

func (g *Guard) refused(ip, reason string) {
	if reason == ReasonPerAddr {
		g.refusedPerAddr.Add(1)
	} else {
		g.refusedTotal.Add(1)
	}
	if g.opts.OnRefuse != nil {
		g.opts.OnRefuse(ip, reason)
	}
}

// Listener is a net.Listener guarded by a Guard.
type Listener struct {
	net.Listener
	g *Guard
}

// Accept returns the next connection within the limits, with the CONNECT
// deadline set. Connections over a limit are closed without a byte.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip := hostOf(c.RemoteAddr())
		if reason := l.g.admit(ip); reason != "" {
			c.Close()
			l.g.refused(ip, reason)
			continue
		}
		gc := &conn{Conn: c, g: l.g, ip: ip}
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
type conn struct {
	net.Conn
	g    *Guard
	ip   string
	once sync.Once

	mu    sync.Mutex // guards the two deadlines and the calls that set them
	user  time.Time  // the write deadline the user asked for; zero = none
	armed time.Time  // the write deadline in force on the socket
}

// Write writes p within the write deadline and closes the connection if
// the write fails.
func (c *conn) Write(p []byte) (int, error) {
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
				c.g.opts.OnWriteTimeout(c.ip)
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

func (c *conn) Close() error {
	c.once.Do(func() { c.g.release(c.ip) })
	return c.Conn.Close()
}

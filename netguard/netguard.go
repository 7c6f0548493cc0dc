// Package netguard wraps the broker's listeners against connection floods
// and slow-loris clients, which mochi-mqtt v2.7.9 does nothing about: it
// sets no read deadline before CONNECT and no limit per source address.
//
// A guarded listener gives every new connection ConnectTimeout to send its
// CONNECT (mochi replaces that deadline with the keepalive one once the
// CONNECT is read), and refuses connections beyond MaxPerAddr from one IP
// address or MaxConns in all by closing them at once.
package netguard

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Options configure a Listener. Zero values mean the defaults.
type Options struct {
	ConnectTimeout time.Duration // 0 = 10 s
	MaxPerAddr     int           // open connections from one IP address; 0 = 256
	MaxConns       int           // open connections in all; 0 = no limit
	// OnRefuse, if set, is called for every connection refused, with the
	// remote IP address and "per-addr" or "total".
	OnRefuse func(addr, reason string)
}

// Listener is a guarded net.Listener.
type Listener struct {
	net.Listener
	opts Options

	mu     sync.Mutex
	perIP  map[string]int
	total  int
	closed atomic.Int64 // refused connections
}

// Wrap guards l.
func Wrap(l net.Listener, opts Options) *Listener {
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = 10 * time.Second
	}
	if opts.MaxPerAddr <= 0 {
		opts.MaxPerAddr = 256
	}
	return &Listener{Listener: l, opts: opts, perIP: map[string]int{}}
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
		if reason := l.admit(ip); reason != "" {
			c.Close()
			l.closed.Add(1)
			if l.opts.OnRefuse != nil {
				l.opts.OnRefuse(ip, reason)
			}
			continue
		}
		c.SetDeadline(time.Now().Add(l.opts.ConnectTimeout))
		return &conn{Conn: c, release: func() { l.release(ip) }}, nil
	}
}

func (l *Listener) admit(ip string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.perIP[ip] >= l.opts.MaxPerAddr:
		return "per-addr"
	case l.opts.MaxConns > 0 && l.total >= l.opts.MaxConns:
		return "total"
	}
	l.perIP[ip]++
	l.total++
	return ""
}

func (l *Listener) release(ip string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.perIP[ip]--; l.perIP[ip] <= 0 {
		delete(l.perIP, ip)
	}
	l.total--
}

// Refused returns how many connections the limits have refused.
func (l *Listener) Refused() int64 { return l.closed.Load() }

// Open returns the number of connections open now.
func (l *Listener) Open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
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

// conn releases its slot once, on the first Close.
type conn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *conn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}

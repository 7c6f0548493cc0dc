package mochifix

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Listener wraps a net.Listener handed to a mochi listener (listeners.NewNet)
// so that Close can wait for the connections it accepted to reach mochi.
//
// mochi's Net.Serve hands each accepted connection to a goroutine of its
// own, which registers the client in a WaitGroup that mochi's Close waits
// on (Listeners.ClientsWg). A connection accepted just before the listener
// closed can register while Close already waits: a WaitGroup Add racing its
// Wait, which the race detector reports and which may let Close return
// before that client ends. mochi registers the client before it reads the
// connection, so a connection that has been read from (or closed) has
// registered: Close waits until every connection this Listener accepted has
// been, after stopping the listeners and before calling mochi's Close.
type Listener struct {
	net.Listener
	pending atomic.Int64 // accepted, neither read from nor closed yet
}

// Track wraps ln; give the result to mochi and to Close.
func Track(ln net.Listener) *Listener { return &Listener{Listener: ln} }

// Accept accepts a connection and counts it until mochi reads it.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.pending.Add(1)
	return &trackedConn{Conn: c, l: l}, nil
}

// settle waits until every accepted connection has reached mochi, or d
// has passed.
func (l *Listener) settle(d time.Duration) {
	deadline := time.Now().Add(d)
	for l.pending.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
}

// trackedConn leaves its Listener's count at its first Read or Close.
type trackedConn struct {
	net.Conn
	l    *Listener
	once sync.Once
}

func (c *trackedConn) arrived() { c.once.Do(func() { c.l.pending.Add(-1) }) }

func (c *trackedConn) Read(b []byte) (int, error) {
	c.arrived()
	return c.Conn.Read(b)
}

func (c *trackedConn) Close() error {
	c.arrived()
	return c.Conn.Close()
}

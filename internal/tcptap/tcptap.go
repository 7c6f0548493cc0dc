// Package tcptap is a TCP proxy for tests that look at what a server
// writes on the wire: each connection to the tap is forwarded to the
// server, and the server's bytes go back to the client through a function
// of the test's, which may read them as they pass.
package tcptap

import (
	"io"
	"net"
	"sync"
	"testing"
)

// Start listens on a loopback port and forwards each connection to
// target. Bytes from the client reach the server unchanged; down copies
// the server's bytes (src) to the client (dst), looking at them as it
// likes, and must return when src ends. It returns the tap's address. The
// test's end closes the listener and every connection and waits for the
// tap's goroutines.
func Start(t testing.TB, target string, down func(dst io.Writer, src io.Reader)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, s)
			mu.Unlock()
			wg.Go(func() { io.Copy(s, c); s.Close() })
			wg.Go(func() { down(c, s); c.Close() })
		}
	})
	return ln.Addr().String()
}

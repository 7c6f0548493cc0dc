package vaultstore_test

import (
	"io"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
)

// connCounter is a TCP proxy to Vault that counts the connections made
// through it: in all, and at most open at once.
type connCounter struct {
	addr string // http://host:port of the proxy

	mu      sync.Mutex
	total   int
	open    int
	maxOpen int
	conns   map[net.Conn]struct{}
}

func startConnCounter(t *testing.T, vaultAddr string) *connCounter {
	t.Helper()
	target, err := url.Parse(vaultAddr)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &connCounter{addr: "http://" + ln.Addr().String(), conns: map[net.Conn]struct{}{}}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target.Host)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.total++
			p.open++
			p.maxOpen = max(p.maxOpen, p.open)
			p.conns[c], p.conns[up] = struct{}{}, struct{}{}
			p.mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); io.Copy(up, c); up.Close() }()
			go func() {
				defer wg.Done()
				io.Copy(c, up)
				c.Close()
				p.mu.Lock()
				p.open--
				delete(p.conns, c)
				delete(p.conns, up)
				p.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		wg.Wait()
	})
	return p
}

func (p *connCounter) counts() (total, maxOpen int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.total, p.maxOpen
}

// TestConnectionsBounded: 500 concurrent reads (a cold cache in a
// reconnect storm) open no more connections to Vault than MaxConns, and
// keep them for the next reads, rather than one descriptor per read.
func TestConnectionsBounded(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	token := v.TokenWithPolicy(t, "m2mguard-broker", brokerPolicy(t))
	for _, tc := range []struct {
		name     string
		maxConns int
		want     int
	}{
		{"default", 0, vaultstore.DefaultMaxConns},
		{"8", 8, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := startConnCounter(t, v.Addr)
			s, err := vaultstore.Open(t.Context(), vaultstore.Options{Address: p.addr, Token: token,
				Timeout: time.Minute, MaxConns: tc.maxConns})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			sn := "CONNS" + tc.name
			if err := s.CreateTerminal(t.Context(), newTerminal(sn)); err != nil {
				t.Fatal(err)
			}
			const reads = 500
			var wg sync.WaitGroup
			errs := make(chan error, reads)
			start := make(chan struct{})
			for range reads {
				wg.Go(func() {
					<-start
					if _, err := s.GetTerminal(t.Context(), sn); err != nil {
						errs <- err
					}
				})
			}
			close(start)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatalf("read: %v", err)
			}
			total, maxOpen := p.counts()
			t.Logf("%d concurrent reads: %d connections to Vault, at most %d open at once (bound %d)", reads, total, maxOpen, tc.want)
			if maxOpen > tc.want || total > tc.want {
				t.Fatalf("%d connections to Vault (%d open at once), want at most %d", total, maxOpen, tc.want)
			}
		})
	}
}

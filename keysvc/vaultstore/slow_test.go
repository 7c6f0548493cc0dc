package vaultstore_test

import (
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
)

// slowProxy forwards TCP to target, holding every chunk from Vault for the
// current delay.
type slowProxy struct {
	ln    net.Listener
	delay atomic.Int64
}

func startSlowProxy(t *testing.T, target string) *slowProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &slowProxy{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c, target)
		}
	}()
	return p
}

func (p *slowProxy) serve(c net.Conn, target string) {
	defer c.Close()
	up, err := net.Dial("tcp", target)
	if err != nil {
		return
	}
	defer up.Close()
	go io.Copy(up, c)
	buf := make([]byte, 32<<10)
	for {
		n, err := up.Read(buf)
		if n > 0 {
			time.Sleep(time.Duration(p.delay.Load()))
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// TestSlowVault: with Vault slower than the store's timeout, reads fail
// with ErrUnavailable within the timeout instead of hanging; the key
// service keeps serving known terminals from its cache (stale, inside
// MaxStale) and refuses unknown ones.
func TestSlowVault(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	p := startSlowProxy(t, v.Addr[len("http://"):])
	// The timeout is well below the slow Vault's 2 s and well above what a
	// healthy call takes on a loaded machine, where several Vault servers
	// start side by side (300 ms was not).
	s, err := vaultstore.Open(t.Context(), vaultstore.Options{
		Address: "http://" + p.ln.Addr().String(), Token: v.Token, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	now := time.Now()
	clock := func() time.Time { return now }
	svc, err := keysvc.New(keysvc.Options{Store: s, Now: clock, Cache: keysvc.CacheOptions{TTL: time.Second, MaxStale: time.Hour}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := svc.Register(ctx, keysvc.RegisterRequest{SN: "SLOW1", IMEI: "354494040518570", IMSI: "460020084678120"}); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Lookup(ctx, "SLOW1"); err != nil {
		t.Fatal(err)
	}

	p.delay.Store(int64(2 * time.Second)) // Vault now answers after 2 s
	now = now.Add(time.Minute)            // past the cache TTL
	_, err = s.GetTerminal(ctx, "SLOW1")
	if !errors.Is(err, keysvc.ErrUnavailable) {
		t.Fatalf("slow Vault: got %v, want ErrUnavailable", err)
	}
	if _, err := svc.Lookup(ctx, "SLOW1"); err != nil {
		t.Fatalf("known terminal with Vault slow: %v, want the cached record", err)
	}
	if st := svc.CacheStats(); st.Stale == 0 {
		t.Fatal("stale serve not counted")
	}
	if _, err := svc.Lookup(ctx, "UNKNOWN1"); !errors.Is(err, keysvc.ErrUnavailable) {
		t.Fatalf("unknown terminal with Vault slow: %v, want ErrUnavailable (fail closed)", err)
	}
	p.delay.Store(0)
	now = now.Add(time.Minute)
	if _, err := svc.Lookup(ctx, "SLOW1"); err != nil {
		t.Fatalf("after Vault recovered: %v", err)
	}
}

// TestTokenRevokedMidRun: the broker's token is revoked while it runs.
// Store calls fail with ErrForbidden naming the path, and the key service
// refuses lookups at once instead of serving stale records: a revoked
// token is a decision of the security team, not an outage (only
// ErrUnavailable is bridged by the cache).
func TestTokenRevokedMidRun(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	token := v.TokenWithPolicy(t, "m2mguard-broker", brokerPolicy(t))
	s := openStore(t, v, token)
	now := time.Now()
	svc, err := keysvc.New(keysvc.Options{Store: s, Now: func() time.Time { return now },
		Cache: keysvc.CacheOptions{TTL: time.Second, MaxStale: time.Hour}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := svc.Register(ctx, keysvc.RegisterRequest{SN: "REVOKED1", IMEI: "354494040518570", IMSI: "460020084678120"}); err != nil {
		t.Fatal(err)
	}
	if err := v.Client(t).Auth().Token().RevokeTreeWithContext(ctx, token); err != nil {
		t.Fatal(err)
	}
	_, err = s.GetTerminal(ctx, "REVOKED1")
	if !errors.Is(err, keysvc.ErrForbidden) {
		t.Fatalf("after revocation: got %v, want ErrForbidden", err)
	}
	now = now.Add(time.Minute)
	_, err = svc.Lookup(ctx, "REVOKED1")
	t.Logf("lookup of a known terminal after revocation: %v", err)
	if err == nil {
		t.Fatal("a revoked token still serves logins from the cache")
	}
}

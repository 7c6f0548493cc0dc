package vaultstore_test

import (
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/storetest"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
)

// TestConformance runs the store suite shared with the embedded store
// against a real Vault dev server, under the shipped least-privilege broker
// policy. Each subtest gets its own server, so Stop can stop it.
func TestConformance(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	servers := map[*testing.T]*vaulttest.Server{}
	tokens := map[*testing.T]string{}
	open := func(t *testing.T) keysvc.Store {
		mu.Lock()
		defer mu.Unlock()
		v, ok := servers[t]
		if !ok {
			v = vaulttest.Start(t)
			servers[t] = v
			tokens[t] = v.TokenWithPolicy(t, "m2mguard-broker", brokerPolicy(t))
		}
		s, err := vaultstore.Open(t.Context(), vaultstore.Options{Address: v.Addr, Token: tokens[t], Timeout: 3 * time.Second})
		if err != nil {
			t.Fatalf("open: %v", err)
		}
		return s
	}
	server := func(t *testing.T) *vaulttest.Server {
		mu.Lock()
		defer mu.Unlock()
		return servers[t]
	}
	storetest.Run(t, open, storetest.Options{
		Reopen: open, // a new client on the same server: what a broker restart is
		Stop:   func(t *testing.T) { server(t).Stop() },
		Forbidden: func(t *testing.T) keysvc.Store {
			v := server(t)
			token := v.TokenWithPolicy(t, "lookup-only", `path "auth/token/lookup-self" { capabilities = ["read"] }`)
			s, err := vaultstore.Open(t.Context(), vaultstore.Options{Address: v.Addr, Token: token})
			if err != nil {
				t.Fatalf("open with the restricted token: %v", err)
			}
			return s
		},
	})
}

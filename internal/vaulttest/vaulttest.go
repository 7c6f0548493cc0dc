// Package vaulttest runs a real HashiCorp Vault (`vault server -dev`) for
// tests: internal/devvault's server, stopped when the test ends, with API
// clients and tokens of a given policy.
//
// Without a vault binary (see devvault.Binary) a test skips, except under
// CI=true, where it fails: CI must never pass by skipping the Vault tests.
package vaulttest

import (
	"context"
	"os"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/m2mguard/m2mguard/internal/devvault"
)

// Server is a running Vault dev server. Its KV v2 engine is mounted at
// "secret/", as in every dev server.
type Server struct {
	*devvault.Server // Addr, Token (never log it), Stop, Pid
}

// Binary returns the path of the vault binary, or an error saying how to
// get one.
func Binary() (string, error) { return devvault.Binary() }

// Start runs a Vault dev server for the test and stops it at cleanup.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := devvault.Binary()
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%v (CI=true: Vault tests may not skip)", err)
		}
		t.Skipf("%v", err)
	}
	s, err := devvault.Start(context.Background(), bin, devvault.Options{Dir: t.TempDir(), TokenPrefix: "m2mguard-test-", Timeout: 30 * time.Second})
	if err != nil {
		t.Fatalf("vaulttest: %v", err)
	}
	t.Cleanup(s.Stop)
	return &Server{s}
}

// Client returns an API client for the server with the root token.
func (s *Server) Client(t testing.TB) *vault.Client {
	t.Helper()
	return s.ClientWithToken(t, s.Token)
}

// ClientWithToken returns an API client for the server with token.
func (s *Server) ClientWithToken(t testing.TB, token string) *vault.Client {
	t.Helper()
	cfg := vault.DefaultConfig()
	cfg.Address = s.Addr
	cfg.MaxRetries = 0
	cfg.Timeout = 5 * time.Second
	c, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatalf("vaulttest: client: %v", err)
	}
	c.SetToken(token)
	return c
}

// TokenWithPolicy writes the HCL policy under name and returns a fresh
// token that has only that policy.
func (s *Server) TokenWithPolicy(t testing.TB, name, hcl string) string {
	t.Helper()
	c := s.Client(t)
	ctx := context.Background()
	if err := c.Sys().PutPolicyWithContext(ctx, name, hcl); err != nil {
		t.Fatalf("vaulttest: put policy %s: %v", name, err)
	}
	secret, err := c.Auth().Token().CreateWithContext(ctx, &vault.TokenCreateRequest{
		Policies: []string{name}, NoDefaultPolicy: true, TTL: "1h",
	})
	if err != nil {
		t.Fatalf("vaulttest: create token: %v", err)
	}
	return secret.Auth.ClientToken
}

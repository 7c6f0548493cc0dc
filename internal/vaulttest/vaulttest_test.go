package vaulttest_test

import (
	"context"
	"errors"
	"net/http"
	"testing"

	vault "github.com/hashicorp/vault/api"

	"github.com/m2mguard/m2mguard/internal/vaulttest"
)

// TestKVv2RoundTrip proves the harness: a real Vault dev server, a KV v2
// secret written and read back through github.com/hashicorp/vault/api, a
// token without rights refused, and the server gone after Stop.
func TestKVv2RoundTrip(t *testing.T) {
	s := vaulttest.Start(t)
	ctx := context.Background()
	kv := s.Client(t).KVv2("secret")

	written, err := kv.Put(ctx, "m2mguard/test/terminal", map[string]any{"sn": "A1", "alg": "hs256"})
	if err != nil {
		t.Fatalf("put: %v", err)
	}
	got, err := kv.Get(ctx, "m2mguard/test/terminal")
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	if got.Data["sn"] != "A1" || got.Data["alg"] != "hs256" || got.VersionMetadata.Version != written.VersionMetadata.Version {
		t.Fatalf("read back %v (version %d), want what was written (version %d)", got.Data, got.VersionMetadata.Version, written.VersionMetadata.Version)
	}

	// Check-and-set: a write against a stale version is refused.
	if _, err := kv.Put(ctx, "m2mguard/test/terminal", map[string]any{"sn": "A1"}, vault.WithCheckAndSet(written.VersionMetadata.Version+5)); err == nil {
		t.Fatal("a check-and-set write with a wrong version succeeded")
	}

	// A token with a policy that grants nothing here is forbidden.
	token := s.TokenWithPolicy(t, "nothing", `path "secret/data/other/*" { capabilities = ["read"] }`)
	_, err = s.ClientWithToken(t, token).KVv2("secret").Get(ctx, "m2mguard/test/terminal")
	var rerr *vault.ResponseError
	if !errors.As(err, &rerr) || rerr.StatusCode != http.StatusForbidden {
		t.Fatalf("restricted token: got %v, want 403", err)
	}

	s.Stop()
	if _, err := kv.Get(ctx, "m2mguard/test/terminal"); err == nil {
		t.Fatal("read succeeded after the server stopped")
	}
}

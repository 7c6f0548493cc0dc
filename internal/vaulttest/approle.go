package vaulttest

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	vault "github.com/hashicorp/vault/api"
)

// WrappedAppRole does what README "Vault layout and policies" tells the
// operator to do for a broker that logs in with AppRole: the policy hcl
// under name, an AppRole role of that name with only that policy, its
// role_id in dir/role_id and a response-wrapped secret_id (a single-use
// wrapping token, 5 minutes) in dir/secret_id.wrapped, both 0600. It
// returns the two paths.
func (s *Server) WrappedAppRole(t testing.TB, dir, name, hcl string) (roleIDFile, wrappedFile string) {
	t.Helper()
	root := s.Client(t)
	ctx := context.Background()
	if err := root.Sys().PutPolicyWithContext(ctx, name, hcl); err != nil {
		t.Fatalf("vaulttest: put policy %s: %v", name, err)
	}
	mounts, err := root.Sys().ListAuthWithContext(ctx)
	if err != nil {
		t.Fatalf("vaulttest: list auth mounts: %v", err)
	}
	if _, ok := mounts["approle/"]; !ok {
		if err := root.Sys().EnableAuthWithOptionsWithContext(ctx, "approle", &vault.EnableAuthOptions{Type: "approle"}); err != nil {
			t.Fatalf("vaulttest: enable approle: %v", err)
		}
	}
	role := "auth/approle/role/" + name
	if _, err := root.Logical().WriteWithContext(ctx, role, map[string]any{
		"token_policies": name, "token_ttl": "1h", "token_max_ttl": "24h"}); err != nil {
		t.Fatalf("vaulttest: approle role: %v", err)
	}
	id, err := root.Logical().ReadWithContext(ctx, role+"/role-id")
	if err != nil {
		t.Fatalf("vaulttest: role_id: %v", err)
	}
	wrapping, err := root.Clone()
	if err != nil {
		t.Fatal(err)
	}
	wrapping.SetToken(root.Token())
	wrapping.SetWrappingLookupFunc(func(string, string) string { return "5m" })
	sec, err := wrapping.Logical().WriteWithContext(ctx, role+"/secret-id", nil)
	if err != nil || sec.WrapInfo == nil {
		t.Fatalf("vaulttest: wrapped secret_id: %v", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	roleIDFile, wrappedFile = filepath.Join(dir, "role_id"), filepath.Join(dir, "secret_id.wrapped")
	for f, v := range map[string]string{roleIDFile: id.Data["role_id"].(string), wrappedFile: sec.WrapInfo.Token} {
		if err := os.WriteFile(f, []byte(v+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return roleIDFile, wrappedFile
}

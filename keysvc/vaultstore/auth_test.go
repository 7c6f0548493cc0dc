package vaultstore_test

import (
	"errors"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
)

// countingProxy is a reverse proxy in front of the real Vault that counts
// the requests per path, so that a test can see how often the store logs in.
type countingProxy struct {
	srv   *http.Server
	addr  string
	mu    sync.Mutex
	paths map[string]int
}

func startCountingProxy(t *testing.T, vaultAddr string) *countingProxy {
	t.Helper()
	target, err := url.Parse(vaultAddr)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &countingProxy{addr: "http://" + ln.Addr().String(), paths: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(target)
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.paths[r.URL.Path]++
		p.mu.Unlock()
		rp.ServeHTTP(w, r)
	}), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); p.srv.Serve(ln) }()
	t.Cleanup(func() { p.srv.Close(); <-done })
	return p
}

func (p *countingProxy) count(path string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.paths[path]
}

// appRole enables AppRole on the dev Vault, writes the broker policy and a
// role "broker" with the given parameters, and returns the root client and
// the role_id.
func appRole(t *testing.T, v *vaulttest.Server, role map[string]any) (*vault.Client, string) {
	t.Helper()
	root := v.Client(t)
	ctx := t.Context()
	if err := root.Sys().EnableAuthWithOptionsWithContext(ctx, "approle", &vault.EnableAuthOptions{Type: "approle"}); err != nil {
		t.Fatal(err)
	}
	if err := root.Sys().PutPolicyWithContext(ctx, "m2mguard-broker", brokerPolicy(t)); err != nil {
		t.Fatal(err)
	}
	role["token_policies"] = "m2mguard-broker"
	if _, err := root.Logical().WriteWithContext(ctx, "auth/approle/role/broker", role); err != nil {
		t.Fatal(err)
	}
	id, err := root.Logical().ReadWithContext(ctx, "auth/approle/role/broker/role-id")
	if err != nil {
		t.Fatal(err)
	}
	return root, id.Data["role_id"].(string)
}

// TestAppRoleBatchTokenNoLoginStorm: a role that issues batch tokens (not
// renewable) must not make the store log in again and again: it logs in
// again after two thirds of the token's TTL, and keeps working.
func TestAppRoleBatchTokenNoLoginStorm(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	root, roleID := appRole(t, v, map[string]any{"token_type": "batch", "token_ttl": "3s", "token_max_ttl": "3s"})
	secretID, err := root.Logical().WriteWithContext(t.Context(), "auth/approle/role/broker/secret-id", nil)
	if err != nil {
		t.Fatal(err)
	}
	p := startCountingProxy(t, v.Addr)
	m, err := vaultstore.NewMetrics(newRegistry(t))
	if err != nil {
		t.Fatal(err)
	}
	s, err := vaultstore.Open(t.Context(), vaultstore.Options{Address: p.addr, Metrics: m, AppRole: &vaultstore.AppRole{
		RoleID: roleID, SecretID: []byte(secretID.Data["secret_id"].(string))}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// An observation window, not a settling wait: within its first second
	// the token (3 s TTL) needs no new login at all.
	time.Sleep(time.Second)
	if n := p.count("/v1/auth/approle/login"); n > 1 {
		t.Fatalf("%d logins within a second of a 3 s batch token; want 1", n)
	}
	// The second login done, its token in use (counted after it is set;
	// the proxy counts the request, before the answer).
	testwait.For(t, 20*time.Second, "a login again before the batch token expires", func() bool {
		return counter(t, m, "m2mguard_vault_logins_total", "approle", "success") >= 2
	})
	if err := s.CreateTerminal(t.Context(), newTerminal("BATCH1")); err != nil {
		t.Fatalf("after the new login: %v", err)
	}
	if n := p.count("/v1/auth/approle/login"); n > 4 {
		t.Fatalf("%d logins; want a handful", n)
	}
}

// wrappedSecretID creates a secret_id for the role "broker" as the
// operator does with `vault write -wrap-ttl=5m -f
// auth/approle/role/broker/secret-id` and returns the wrapping token.
func wrappedSecretID(t *testing.T, root *vault.Client, path string) string {
	t.Helper()
	c, err := root.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(root.Token())
	c.SetWrappingLookupFunc(func(operation, p string) string { return "5m" })
	sec, err := c.Logical().WriteWithContext(t.Context(), path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if sec == nil || sec.WrapInfo == nil || sec.WrapInfo.Token == "" {
		t.Fatalf("no wrapped answer: %+v", sec)
	}
	return sec.WrapInfo.Token
}

// TestAppRoleWrappedSecretID: the broker is given a response-wrapping token
// instead of the secret_id. It unwraps it once, logs in, and logs in again
// with the unwrapped secret_id when its token reaches its max TTL. The same
// wrapping token offered again (a second start, or someone who intercepted
// it and used it first) fails with ErrWrappingToken and says what that
// means; a wrapping token of anything but a secret_id is refused without
// being used up.
func TestAppRoleWrappedSecretID(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	root, roleID := appRole(t, v, map[string]any{"token_ttl": "2s", "token_max_ttl": "3s"})
	ctx := t.Context()
	wt := wrappedSecretID(t, root, "auth/approle/role/broker/secret-id")

	logs := &strings.Builder{}
	var logMu sync.Mutex
	m, err := vaultstore.NewMetrics(newRegistry(t))
	if err != nil {
		t.Fatal(err)
	}
	s, err := vaultstore.Open(ctx, vaultstore.Options{Address: v.Addr, Metrics: m, Logger: testLogger(&logMu, logs),
		AppRole: &vaultstore.AppRole{RoleID: roleID, WrappingToken: []byte(wt)}})
	if err != nil {
		t.Fatalf("open with a wrapped secret_id: %v", err)
	}
	defer s.Close()
	if err := s.CreateTerminal(ctx, newTerminal("WRAP1")); err != nil {
		t.Fatalf("create: %v", err)
	}
	testwait.For(t, 20*time.Second, "a second AppRole login (max TTL 3 s) with the unwrapped secret_id",
		func() bool { return counter(t, m, "m2mguard_vault_logins_total", "approle", "success") >= 2 })
	if _, err := s.GetTerminal(ctx, "WRAP1"); err != nil {
		t.Fatalf("after the new login: %v", err)
	}

	// The wrapping token again: it was used up.
	_, err = vaultstore.Open(ctx, vaultstore.Options{Address: v.Addr, AppRole: &vaultstore.AppRole{RoleID: roleID, WrappingToken: []byte(wt)}})
	if !errors.Is(err, vaultstore.ErrWrappingToken) || !errors.Is(err, keysvc.ErrForbidden) || !strings.Contains(err.Error(), "already unwrapped") {
		t.Fatalf("a used wrapping token: got %v, want ErrWrappingToken saying it was already unwrapped", err)
	}
	t.Logf("used wrapping token: %v", err)

	// A wrapping token of the role_id (not a secret_id): refused, not spent.
	roleWrap := wrappedRead(t, root, "auth/approle/role/broker/role-id")
	_, err = vaultstore.Open(ctx, vaultstore.Options{Address: v.Addr, AppRole: &vaultstore.AppRole{RoleID: roleID, WrappingToken: []byte(roleWrap)}})
	if !errors.Is(err, vaultstore.ErrWrappingToken) || !strings.Contains(err.Error(), "auth/approle/role/broker/role-id") {
		t.Fatalf("a wrapping token of the role_id: got %v, want ErrWrappingToken naming what it wraps", err)
	}
	if sec, err := root.Logical().UnwrapWithContext(ctx, roleWrap); err != nil || sec.Data["role_id"] != roleID {
		t.Fatalf("the refused wrapping token was used up: %v", err)
	}

	// No secret in the log: neither the wrapping token nor the secret_id.
	logMu.Lock()
	defer logMu.Unlock()
	if strings.Contains(logs.String(), wt) {
		t.Fatal("the log carries the wrapping token")
	}
	if !strings.Contains(logs.String(), "secret_id unwrapped") {
		t.Fatalf("the log does not tell of the unwrap:\n%s", logs.String())
	}
}

// wrappedRead reads path as a response-wrapped answer and returns the
// wrapping token.
func wrappedRead(t *testing.T, root *vault.Client, path string) string {
	t.Helper()
	c, err := root.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(root.Token())
	c.SetWrappingLookupFunc(func(operation, p string) string { return "5m" })
	sec, err := c.Logical().ReadWithContext(t.Context(), path)
	if err != nil || sec == nil || sec.WrapInfo == nil {
		t.Fatalf("wrapped read of %s: %v", path, err)
	}
	return sec.WrapInfo.Token
}

// TestKubernetesAuth: the store logs in with Vault's Kubernetes auth method
// (a real Vault, whose kubernetes method asks the TokenReview API above),
// reading the service account token from its file, works under the broker
// policy, and logs in again, reading the file again, when its token reaches
// its max TTL. A token the TokenReview API does not know is refused with
// ErrForbidden.
func TestKubernetesAuth(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	ctx := t.Context()
	sa := vaulttest.ServiceAccount{Namespace: "iot", Name: "m2mguard", UID: "5b2e6d1c-7a8f-4c3e-9d10-2f4a6b8c0e12"}
	tr := vaulttest.StartTokenReview(t)
	jwt := tr.Issue(t, sa)
	v.EnableKubernetesAuth(t, tr, "m2mguard-broker", sa, "m2mguard-broker", brokerPolicy(t), "2s", "3s")
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(jwt), 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := vaultstore.NewMetrics(newRegistry(t))
	if err != nil {
		t.Fatal(err)
	}
	s, err := vaultstore.Open(ctx, vaultstore.Options{Address: v.Addr, Metrics: m,
		Kubernetes: &vaultstore.Kubernetes{Role: "m2mguard-broker", TokenFile: tokenFile}})
	if err != nil {
		t.Fatalf("open with Kubernetes auth: %v", err)
	}
	defer s.Close()
	if err := s.CreateTerminal(ctx, newTerminal("KUBE1")); err != nil {
		t.Fatalf("create under the broker policy: %v", err)
	}
	if tr.Reviews() < 1 {
		t.Fatal("Vault never asked the TokenReview API")
	}
	testwait.For(t, 20*time.Second, "a second Kubernetes login (max TTL 3 s)",
		func() bool { return counter(t, m, "m2mguard_vault_logins_total", "kubernetes", "success") >= 2 })
	if _, err := s.GetTerminal(ctx, "KUBE1"); err != nil {
		t.Fatalf("after the new login: %v", err)
	}
	if tr.Reviews() < 2 {
		t.Fatal("the second login did not go through the TokenReview API")
	}

	// A service account token the cluster does not know.
	if err := os.WriteFile(tokenFile, []byte(vaulttest.ServiceAccountJWT(t, sa)), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = vaultstore.Open(ctx, vaultstore.Options{Address: v.Addr, Kubernetes: &vaultstore.Kubernetes{Role: "m2mguard-broker", TokenFile: tokenFile}})
	if !errors.Is(err, keysvc.ErrForbidden) {
		t.Fatalf("an unknown service account token: got %v, want ErrForbidden", err)
	}
	t.Logf("unknown service account token: %v", err)
	// No token file at all.
	_, err = vaultstore.Open(ctx, vaultstore.Options{Address: v.Addr, Kubernetes: &vaultstore.Kubernetes{Role: "m2mguard-broker", TokenFile: filepath.Join(dir, "none")}})
	if !errors.Is(err, keysvc.ErrInvalid) || !strings.Contains(err.Error(), "none") {
		t.Fatalf("a missing token file: got %v, want ErrInvalid naming the file", err)
	}
}

// TestTokenRenewalMetrics: the renewals of the token, their failures (Vault
// stopped), the token's remaining TTL and failed requests show in the
// metrics.
func TestTokenRenewalMetrics(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	root := v.Client(t)
	ctx := t.Context()
	if err := root.Sys().PutPolicyWithContext(ctx, "m2mguard-broker", brokerPolicy(t)); err != nil {
		t.Fatal(err)
	}
	tok, err := root.Auth().Token().CreateWithContext(ctx, &vault.TokenCreateRequest{
		Policies: []string{"m2mguard-broker"}, NoDefaultPolicy: true, TTL: "3s", ExplicitMaxTTL: "1h"})
	if err != nil {
		t.Fatal(err)
	}
	m, err := vaultstore.NewMetrics(newRegistry(t))
	if err != nil {
		t.Fatal(err)
	}
	s, err := vaultstore.Open(ctx, vaultstore.Options{Address: v.Addr, Token: tok.Auth.ClientToken, Metrics: m, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := counter(t, m, "m2mguard_vault_logins_total", "token", "success"); got != 1 {
		t.Fatalf("logins{token,success} = %v, want 1", got)
	}
	if ttl := counter(t, m, "m2mguard_vault_token_ttl_seconds"); ttl <= 0 || ttl > 3 {
		t.Fatalf("token ttl %v, want within (0, 3]", ttl)
	}
	testwait.For(t, 20*time.Second, "a renewal", func() bool { return counter(t, m, "m2mguard_vault_token_renewals_total", "success") >= 1 })
	if f := counter(t, m, "m2mguard_vault_token_renewals_total", "failure"); f != 0 {
		t.Fatalf("renewal failures %v before Vault stopped", f)
	}
	v.Stop()
	testwait.For(t, 20*time.Second, "a failed renewal counted", func() bool { return counter(t, m, "m2mguard_vault_token_renewals_total", "failure") >= 1 })
	if _, err := s.GetTerminal(ctx, "T1"); !errors.Is(err, keysvc.ErrUnavailable) {
		t.Fatalf("get with Vault stopped: %v", err)
	}
	if f := counter(t, m, "m2mguard_vault_request_failures_total", "unavailable"); f < 1 {
		t.Fatalf("request_failures{unavailable} = %v", f)
	}
}

// TestOrchestratorPolicy: the shipped deploy/vault/orchestrator.hcl lets its
// holder create secret_ids of the broker's role only response-wrapped (the
// operator flow of deploy/vault/README.md), and the broker starts with such
// a wrapping token under the shipped broker policy.
func TestOrchestratorPolicy(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	root := v.Client(t)
	ctx := t.Context()
	if err := root.Sys().EnableAuthWithOptionsWithContext(ctx, "approle", &vault.EnableAuthOptions{Type: "approle"}); err != nil {
		t.Fatal(err)
	}
	if err := root.Sys().PutPolicyWithContext(ctx, "m2mguard-broker", brokerPolicy(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := root.Logical().WriteWithContext(ctx, "auth/approle/role/m2mguard-broker", map[string]any{
		"token_policies": "m2mguard-broker", "token_ttl": "1h", "token_max_ttl": "24h", "secret_id_num_uses": 0}); err != nil {
		t.Fatal(err)
	}
	hcl, err := os.ReadFile(filepath.Join("..", "..", "deploy", "vault", "orchestrator.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	orch := v.ClientWithToken(t, v.TokenWithPolicy(t, "m2mguard-orchestrator", string(hcl)))
	if _, err := orch.Logical().WriteWithContext(ctx, "auth/approle/role/m2mguard-broker/secret-id", nil); err == nil {
		t.Fatal("the orchestrator got a secret_id without wrapping")
	}
	roleID, err := orch.Logical().ReadWithContext(ctx, "auth/approle/role/m2mguard-broker/role-id")
	if err != nil {
		t.Fatalf("the orchestrator reads the role_id: %v", err)
	}
	wt := wrappedSecretID(t, orch, "auth/approle/role/m2mguard-broker/secret-id")
	s, err := vaultstore.Open(ctx, vaultstore.Options{Address: v.Addr, AppRole: &vaultstore.AppRole{
		RoleID: roleID.Data["role_id"].(string), WrappingToken: []byte(wt)}})
	if err != nil {
		t.Fatalf("the broker with the orchestrator's wrapping token: %v", err)
	}
	defer s.Close()
	if err := s.CreateTerminal(ctx, newTerminal("ORCH1")); err != nil {
		t.Fatal(err)
	}
}

package vaultstore_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
)

// brokerPolicy is the least-privilege policy shipped for the broker; the
// tests run the store under it, so the policy is tested too.
func brokerPolicy(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "deploy", "vault", "broker.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func openStore(t *testing.T, v *vaulttest.Server, token string) *vaultstore.Store {
	t.Helper()
	s, err := vaultstore.Open(t.Context(), vaultstore.Options{Address: v.Addr, Token: token, Timeout: 3 * time.Second})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newTerminal(sn string) *keysvc.Terminal {
	return &keysvc.Terminal{
		SN: sn, IMEI: "354494040518570", IMSI: "460020084678120", Alg: codec.HS256, Status: keysvc.StatusActive,
		Creds: keysvc.Credentials{
			Up: []byte("upPassword000001"), UpExp: codec.Never, Down: []byte("downPassword0001"), DownExp: codec.Never,
			BK: bytes.Repeat([]byte{1}, 32), BKExp: codec.Never,
		},
		Created: time.Now().UTC().Truncate(time.Second), Updated: time.Now().UTC().Truncate(time.Second),
	}
}

func TestUnderBrokerPolicy(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	s := openStore(t, v, v.TokenWithPolicy(t, "m2mguard-broker", brokerPolicy(t)))
	ctx := t.Context()

	term := newTerminal("T1")
	if err := s.CreateTerminal(ctx, term); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := s.CreateTerminal(ctx, newTerminal("T1")); !errors.Is(err, keysvc.ErrExists) {
		t.Fatalf("second create: got %v, want ErrExists", err)
	}
	got, err := s.GetTerminal(ctx, "T1")
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	if got.Version != term.Version || !bytes.Equal(got.Creds.Up, term.Creds.Up) {
		t.Fatalf("get: %v (version %d, want %d)", err, got.Version, term.Version)
	}
	// Two writers from one version: exactly one wins.
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := got.Clone()
			c.MSISDN = "86138000000" + string(rune('0'+i))
			errs[i] = s.UpdateTerminal(ctx, c)
		}()
	}
	wg.Wait()
	won, lost := 0, 0
	for _, err := range errs {
		switch {
		case err == nil:
			won++
		case errors.Is(err, keysvc.ErrConflict):
			lost++
		default:
			t.Fatalf("update: %v", err)
		}
	}
	if won != 1 || lost != 1 {
		t.Fatalf("%d won, %d lost; want exactly one winner", won, lost)
	}
	if names, err := s.ListTerminals(ctx, "", 10); err != nil || len(names) != 1 || names[0] != "T1" {
		t.Fatalf("list: %v %v", names, err)
	}
	if err := s.DeleteTerminal(ctx, "T1"); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if _, err := s.GetTerminal(ctx, "T1"); !errors.Is(err, keysvc.ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	if err := s.UpdateTerminal(ctx, got); !errors.Is(err, keysvc.ErrNotFound) {
		t.Fatalf("update after delete: got %v, want ErrNotFound", err)
	}
	if err := s.PutApp(ctx, &keysvc.App{Name: "dash", PasswordHash: "$argon2id$x", Subscribe: []string{"m2m/+/up/#"}}); err != nil {
		t.Fatalf("put app: %v", err)
	}
	if a, err := s.GetApp(ctx, "dash"); err != nil || a.Subscribe[0] != "m2m/+/up/#" {
		t.Fatalf("get app: %v %v", a, err)
	}
}

// TestForbidden: a token without the policy gets ErrForbidden naming the path.
func TestForbidden(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	token := v.TokenWithPolicy(t, "lookup-only", `path "auth/token/lookup-self" { capabilities = ["read"] }`)
	s := openStore(t, v, token)
	_, err := s.GetTerminal(t.Context(), "T1")
	if !errors.Is(err, keysvc.ErrForbidden) || !strings.Contains(err.Error(), "m2mguard/terminals/T1") {
		t.Fatalf("got %v, want ErrForbidden naming the path", err)
	}
	if strings.Contains(err.Error(), token) {
		t.Fatal("error carries the token")
	}
	// A token that is not valid at all is refused at Open.
	_, err = vaultstore.Open(t.Context(), vaultstore.Options{Address: v.Addr, Token: "not-a-token"})
	if !errors.Is(err, keysvc.ErrForbidden) {
		t.Fatalf("open with a bad token: got %v, want ErrForbidden", err)
	}
}

// TestUnavailable: a stopped Vault gives ErrUnavailable, not a hang.
func TestUnavailable(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	s := openStore(t, v, v.Token)
	v.Stop()
	_, err := s.GetTerminal(t.Context(), "T1")
	if !errors.Is(err, keysvc.ErrUnavailable) {
		t.Fatalf("got %v, want ErrUnavailable", err)
	}
	_, err = vaultstore.Open(t.Context(), vaultstore.Options{Address: v.Addr, Token: v.Token})
	if !errors.Is(err, keysvc.ErrUnavailable) {
		t.Fatalf("open against a stopped vault: got %v, want ErrUnavailable", err)
	}
}

// TestAppRoleRelogin: with AppRole, the store logs in again when its token
// reaches its max TTL, and keeps working.
func TestAppRoleRelogin(t *testing.T) {
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
	if _, err := root.Logical().WriteWithContext(ctx, "auth/approle/role/broker", map[string]any{
		"token_policies": "m2mguard-broker", "token_ttl": "2s", "token_max_ttl": "3s",
	}); err != nil {
		t.Fatal(err)
	}
	roleID, err := root.Logical().ReadWithContext(ctx, "auth/approle/role/broker/role-id")
	if err != nil {
		t.Fatal(err)
	}
	secretID, err := root.Logical().WriteWithContext(ctx, "auth/approle/role/broker/secret-id", nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := vaultstore.Open(ctx, vaultstore.Options{Address: v.Addr, AppRole: &vaultstore.AppRole{
		RoleID: roleID.Data["role_id"].(string), SecretID: []byte(secretID.Data["secret_id"].(string)),
	}})
	if err != nil {
		t.Fatalf("open with AppRole: %v", err)
	}
	defer s.Close()
	if err := s.CreateTerminal(ctx, newTerminal("T2")); err != nil {
		t.Fatalf("create: %v", err)
	}
	// Well past the first token's max TTL, the store still works: it
	// logged in again. Poll instead of asserting a time.
	// The sleep is the point: 4 s is past the first token's max TTL (3 s).
	time.Sleep(4 * time.Second)
	if !testwait.Until(16*time.Second, func() bool { _, err = s.GetTerminal(ctx, "T2"); return err == nil }) {
		t.Fatalf("after the first token expired: %v", err)
	}
}

func TestTransitSessionKeys(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	root := v.Client(t)
	ctx := t.Context()
	if err := root.Sys().MountWithContext(ctx, "transit", &vault.MountInput{Type: "transit"}); err != nil {
		t.Fatal(err)
	}
	if _, err := root.Logical().WriteWithContext(ctx, "transit/keys/m2mguard-session", nil); err != nil {
		t.Fatal(err)
	}
	s := openStore(t, v, v.TokenWithPolicy(t, "m2mguard-broker", brokerPolicy(t)))
	keys := &vaultstore.TransitKeys{Store: s}
	a, err := keys.NewSessionKey(ctx, "T1")
	if err != nil {
		t.Fatalf("session key: %v", err)
	}
	b, _ := keys.NewSessionKey(ctx, "T1")
	if len(a) != codec.SessionKeySize || bytes.Equal(a, b) {
		t.Fatal("want two different 32-byte keys")
	}
}

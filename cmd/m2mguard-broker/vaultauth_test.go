package main

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

// TestProductionVaultAuthAndSMSBinary runs the broker binary the way
// production does: logged in to Vault with AppRole and a response-wrapped
// secret_id written by the operator (the shipped broker policy), with an
// SMS gateway that first answers 429 Retry-After: 1. A credential change
// that must go by SMS waits that second and arrives once; /metrics shows
// the AppRole login, the token's time to live and the retry; no log line
// carries the wrapping token or the SMS text. Started again with the same
// wrapping token, the binary refuses to start and names the file.
func TestProductionVaultAuthAndSMSBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	v := vaulttest.Start(t)
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	gw.FailNextWith(1, http.StatusTooManyRequests)
	gw.RetryAfter("1")

	policy, err := os.ReadFile("../../deploy/vault/broker.hcl")
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	roleID, wrapped := v.WrappedAppRole(t, filepath.Join(work, "secrets"), "m2mguard-broker", string(policy))
	args := []string{"--store-type", "vault", "--store-vault-address", v.Addr,
		"--store-vault-approle-role-id-file", roleID, "--store-vault-approle-wrapping-token-file", wrapped,
		"--sms-url", gw.URL() + "/send", "--sms-backoff", "10ms", "--sms-max-backoff", "20ms"}
	bin := buildBinary(t)
	p := startBinary(t, bin, work, args...)
	if logs := p.logs.String(); !strings.Contains(logs, "auth=approle") || !strings.Contains(logs, "secret_id unwrapped") {
		t.Fatalf("the broker did not log in with the unwrapped secret_id:\n%s", logs)
	}

	// A change that must go by SMS: started while the terminal is away, it
	// logs in without its basic key's digest.
	ctx := t.Context()
	api := adminClient(t, p.admin, work)
	b, err := api.Register(ctx, adminapi.RegisterRequest{SN: "PROD1", IMEI: "354494040518570", IMSI: "460020084678120", MSISDN: "+8613800000009"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.StartChange(ctx, b.SN, "pwd"); err != nil {
		t.Fatal(err)
	}
	if code := connect(t, p.mqtt, b.SN, b.IMEI+":"+b.IMSI, loginToken(t, *b)); code != 0 {
		t.Fatalf("login: CONNACK %d", code)
	}
	testwait.For(t, 20*time.Second, "the SMS sent", func() bool { return p.metric(t, work, `m2mguard_sms_sends_total{result="sent"}`) >= 1 })
	at, msgs := gw.Arrivals(), gw.Messages()
	if len(at) != 2 || len(msgs) != 1 || msgs[0].To != b.MSISDN {
		t.Fatalf("%d attempts, %d messages; want 2 and 1 to the terminal", len(at), len(msgs))
	}
	if gap := at[1].Sub(at[0]); gap < time.Second {
		t.Fatalf("retried %v after a 429 with Retry-After: 1", gap)
	}

	m, err := api.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for sample, want := range map[string]func(float64) bool{
		`m2mguard_vault_logins_total{method="approle",result="success"}`: func(v float64) bool { return v >= 1 },
		`m2mguard_vault_token_ttl_seconds`:                               func(v float64) bool { return v > 0 && v <= 3600 },
		`m2mguard_sms_retries_total`:                                     func(v float64) bool { return v == 1 },
	} {
		if got, ok := m.Value(sample); !ok || !want(got) {
			t.Errorf("/metrics: %s = %v (present %v)", sample, got, ok)
		}
	}
	token, _ := os.ReadFile(wrapped)
	for _, secret := range []string{strings.TrimSpace(string(token)), msgs[0].Text, b.Up} {
		if strings.Contains(p.logs.String(), secret) {
			t.Fatal("the broker's log carries a secret (wrapping token, SMS text or password)")
		}
	}
	p.terminate(t)

	// The wrapping token is spent: a second start is refused, naming the file.
	again := startFailing(t, bin, work, args...)
	if !strings.Contains(again, "already unwrapped") || !strings.Contains(again, wrapped) {
		t.Fatalf("second start with the same wrapping token:\n%s", again)
	}
}

// startFailing runs bin in work with args and returns what it wrote,
// failing the test unless it exits with status 1 (a start failure) within
// a minute.
func startFailing(t *testing.T, bin, work string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"--mqtt-tcp", freePort(t), "--mqtt-ws", ""}, args...)...)
	cmd.Dir = work
	cmd.Env = append(os.Environ(), "M2MGUARD_ADMIN_LISTEN="+freePort(t))
	out, err := cmd.CombinedOutput()
	if cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 1 {
		t.Fatalf("want exit status 1, got %v:\n%s", err, out)
	}
	return string(out)
}

// TestKubernetesAuthBinary: the broker binary in a pod's place logs in to
// Vault through its Kubernetes auth method (the service account's JWT,
// checked by a TokenReview API the test serves), under the shipped broker
// policy, and a terminal registered through
// its admin API logs in over MQTT.
func TestKubernetesAuthBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	v := vaulttest.Start(t)
	sa := vaulttest.ServiceAccount{Namespace: "iot", Name: "m2mguard", UID: "0d8c4b9e-1f2a-4e6b-8c3d-5a7b9c1d3e5f"}
	tr := vaulttest.StartTokenReview(t)
	policy, err := os.ReadFile("../../deploy/vault/broker.hcl")
	if err != nil {
		t.Fatal(err)
	}
	v.EnableKubernetesAuth(t, tr, "m2mguard-broker", sa, "m2mguard-broker", string(policy), "1h", "24h")
	work := t.TempDir()
	jwt := filepath.Join(work, "token")
	if err := os.WriteFile(jwt, []byte(tr.Issue(t, sa)), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startBinary(t, buildBinary(t), work, "--store-type", "vault", "--store-vault-address", v.Addr,
		"--store-vault-kubernetes-role", "m2mguard-broker", "--store-vault-kubernetes-token-file", jwt)
	if !strings.Contains(p.logs.String(), "auth=kubernetes") || tr.Reviews() == 0 {
		t.Fatalf("no Kubernetes login (%d token reviews):\n%s", tr.Reviews(), p.logs)
	}
	if got := p.metric(t, work, `m2mguard_vault_logins_total{method="kubernetes",result="success"}`); got < 1 {
		t.Fatalf("vault logins{kubernetes,success} = %v", got)
	}
	b := p.register(t, work, "KUBE1")
	if code := connect(t, p.mqtt, b.SN, b.IMEI+":"+b.IMSI, loginToken(t, b)); code != 0 {
		t.Fatalf("login of a terminal stored through Kubernetes auth: CONNACK %d", code)
	}
}

package broker_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
)

// TestBrokerKubernetesAuth: the broker configured by environment variables
// alone (store.type vault, store.vault.kubernetes.role and token_file) logs
// in to a real Vault through its Kubernetes auth method, under the shipped
// broker policy, and a terminal registered there logs in over MQTT.
func TestBrokerKubernetesAuth(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	sa := vaulttest.ServiceAccount{Namespace: "iot", Name: "m2mguard", UID: "0d8c4b9e-1f2a-4e6b-8c3d-5a7b9c1d3e5f"}
	tr := vaulttest.StartTokenReview(t)
	policy, err := os.ReadFile("../deploy/vault/broker.hcl")
	if err != nil {
		t.Fatal(err)
	}
	v.EnableKubernetesAuth(t, tr, "m2mguard-broker", sa, "m2mguard-broker", string(policy), "1h", "24h")
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(tr.Issue(t, sa)), 0o600); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{
		"M2MGUARD_DATA_DIR": filepath.Join(t.TempDir(), "data"), "M2MGUARD_MQTT_TCP": "127.0.0.1:0", "M2MGUARD_MQTT_WS": "off",
		"M2MGUARD_ADMIN_LISTEN": "127.0.0.1:0", "M2MGUARD_STORE_TYPE": "vault", "M2MGUARD_STORE_VAULT_ADDRESS": v.Addr,
		"M2MGUARD_STORE_VAULT_KUBERNETES_ROLE": "m2mguard-broker", "M2MGUARD_STORE_VAULT_KUBERNETES_TOKEN_FILE": tokenFile,
		"VAULT_TOKEN": "ignored-when-kubernetes-auth-is-set",
	}
	cfg, err := broker.Resolve(pflagWith(), func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err != nil {
		t.Fatal(err)
	}
	b, logs := start(t, cfg)
	if !strings.Contains(logs.String(), "auth=kubernetes") {
		t.Fatalf("the broker does not say it used Kubernetes auth:\n%s", logs)
	}
	if got := seriesValue(t, b.Registry(), "m2mguard_vault_logins_total", "kubernetes", "success"); got != 1 {
		t.Fatalf("vault logins{kubernetes,success} = %v, want 1", got)
	}
	if tr.Reviews() == 0 {
		t.Fatal("Vault never asked the TokenReview API")
	}
	tm, err := b.Service().Register(t.Context(), keysvc.RegisterRequest{SN: "KUBE1", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		t.Fatalf("register on Vault: %v", err)
	}
	login(t, b.Addr("tcp"), tm).Close()
}

// TestBrokerWrappingTokenOnlyOnce: the broker starts with a response-wrapped
// secret_id (store.vault.approle.wrapping_token_file); started again with the
// same file, it refuses to start and says why: the token was used, so this
// start needs a fresh one, and if none of its starts used it, someone else
// did.
func TestBrokerWrappingTokenOnlyOnce(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	cfg := testConfig(t)
	cfg.Store.Type = "vault"
	cfg.Store.Vault.Address = v.Addr
	cfg.Store.Vault.AppRoleRoleIDFile, cfg.Store.Vault.AppRoleWrappingTokenFile = operatorAppRole(t, v, filepath.Join(t.TempDir(), "secrets"))
	b, logs := start(t, cfg)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	wt, _ := os.ReadFile(cfg.Store.Vault.AppRoleWrappingTokenFile)
	if strings.Contains(logs.String(), strings.TrimSpace(string(wt))) {
		t.Fatal("the log carries the wrapping token")
	}

	again := *cfg
	_, err := broker.Start(t.Context(), &again, nil)
	if !errors.Is(err, vaultstore.ErrWrappingToken) || !errors.Is(err, keysvc.ErrForbidden) ||
		!strings.Contains(err.Error(), "already unwrapped") || !strings.Contains(err.Error(), "fresh wrapping token into "+cfg.Store.Vault.AppRoleWrappingTokenFile) {
		t.Fatalf("second start with the same wrapping token: got %v", err)
	}
	t.Logf("second start: %v", err)
}

// seriesValue returns the value of the series of name with the label values
// given (in the metric's label order), or -1.
func seriesValue(t *testing.T, g prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if labelValues(m) == strings.Join(labels, ",") {
				switch {
				case m.GetCounter() != nil:
					return m.GetCounter().GetValue()
				case m.GetGauge() != nil:
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	return -1
}

func labelValues(m *dto.Metric) string {
	var vs []string
	for _, l := range m.GetLabel() {
		vs = append(vs, l.GetValue())
	}
	return strings.Join(vs, ",")
}

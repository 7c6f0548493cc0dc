package demo_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/examples/internal/demo"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
)

func config(t *testing.T) *broker.Config {
	cfg := broker.Default()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.MQTT.TCP, cfg.MQTT.WS, cfg.Admin.Listen = "127.0.0.1:0", "", ""
	return cfg
}

func check(t *testing.T, out string) {
	t.Helper()
	for _, want := range []string{"session key sid", "application received the plaintext: m2m/", "committed on both sides", `{"t":21.7}`, "done"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// The quickstart's walk-through on the embedded store.
func TestQuickstart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out bytes.Buffer
	if err := demo.Run(ctx, config(t), "A00MS8011390002S", &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	check(t, out.String())
}

// The vault example's walk-through on a real Vault, with the broker's
// least-privilege policy.
func TestVault(t *testing.T) {
	v := vaulttest.Start(t)
	policy, err := os.ReadFile("../../../deploy/vault/broker.hcl")
	if err != nil {
		t.Fatal(err)
	}
	cfg := config(t)
	cfg.Store.Type = "vault"
	cfg.Store.Vault.Address, cfg.Store.Vault.Token = v.Addr, v.TokenWithPolicy(t, "m2mguard-broker", string(policy))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out bytes.Buffer
	if err := demo.Run(ctx, cfg, "VAULTDEMO1", &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	check(t, out.String())
}

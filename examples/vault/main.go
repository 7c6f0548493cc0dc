// Command vault is the quickstart against HashiCorp Vault: terminal records
// live in KV v2 under secret/m2mguard/ instead of the embedded store.
//
//	vault server -dev -dev-root-token-id=root &     # or any Vault with KV v2 at secret/
//	VAULT_ADDR=http://127.0.0.1:8200 VAULT_TOKEN=root go run ./examples/vault
//
// Afterwards `vault kv get secret/m2mguard/terminals/VAULTDEMO1` shows the
// record (the token needs the capabilities of deploy/vault/broker.hcl).
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/examples/internal/demo"
)

func main() {
	addr, token := os.Getenv("VAULT_ADDR"), os.Getenv("VAULT_TOKEN")
	if addr == "" || token == "" {
		fmt.Fprintln(os.Stderr, "vault example: set VAULT_ADDR and VAULT_TOKEN (e.g. vault server -dev)")
		os.Exit(2)
	}
	cfg := broker.Default()
	cfg.Store.Type = "vault"
	cfg.Store.Vault.Address, cfg.Store.Vault.Token = addr, token
	cfg.MQTT.TCP = "127.0.0.1:0"
	cfg.MQTT.WS, cfg.Admin.Listen = "", ""

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := demo.Run(ctx, cfg, "VAULTDEMO1", os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "vault example:", err)
		os.Exit(1)
	}
}

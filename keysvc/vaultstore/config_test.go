package vaultstore_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
)

func TestConfigValidate(t *testing.T) {
	valid := func(edit func(*vaultstore.Config)) vaultstore.Config {
		c := vaultstore.DefaultConfig()
		c.Address, c.Token = "https://vault:8200", "t"
		if edit != nil {
			edit(&c)
		}
		return c
	}
	for _, tc := range []struct {
		name    string
		cfg     vaultstore.Config
		key     string // "" = valid
		message string
	}{
		{"token", valid(nil), "", ""},
		{"token file", valid(func(c *vaultstore.Config) { c.Token, c.TokenFile = "", "/run/token" }), "", ""},
		{"approle from files beats an inherited token", valid(func(c *vaultstore.Config) {
			c.AppRoleRoleIDFile, c.AppRoleSecretIDFile = "/run/role_id", "/run/secret_id"
		}), "", ""},
		{"transit", valid(func(c *vaultstore.Config) { c.Transit = true }), "", ""},
		{"no address", valid(func(c *vaultstore.Config) { c.Address = "" }), "address", "required"},
		{"address not a URL", valid(func(c *vaultstore.Config) { c.Address = "vault:8200" }), "address", "URL"},
		{"no mount", valid(func(c *vaultstore.Config) { c.Mount = "" }), "mount", "empty"},
		{"no prefix", valid(func(c *vaultstore.Config) { c.Prefix = "" }), "prefix", "empty"},
		{"role_id twice", valid(func(c *vaultstore.Config) { c.AppRoleRoleID, c.AppRoleRoleIDFile, c.AppRoleSecretID = "r", "/f", "s" }),
			"approle.role_id_file", "not both"},
		{"secret_id twice", valid(func(c *vaultstore.Config) { c.AppRoleRoleID, c.AppRoleSecretID, c.AppRoleSecretIDFile = "r", "s", "/f" }),
			"approle.secret_id_file", "one of"},
		{"secret_id and wrapping token", valid(func(c *vaultstore.Config) {
			c.AppRoleRoleID, c.AppRoleSecretIDFile, c.AppRoleWrappingTokenFile = "r", "/s", "/w"
		}), "approle.secret_id_file", "wrapping_token_file"},
		{"approle with a wrapping token", valid(func(c *vaultstore.Config) { c.AppRoleRoleID, c.AppRoleWrappingTokenFile = "r", "/w" }), "", ""},
		{"wrapping token without role_id", valid(func(c *vaultstore.Config) { c.AppRoleWrappingTokenFile = "/w" }), "approle.role_id", "wrapping token"},
		{"kubernetes beats an inherited token", valid(func(c *vaultstore.Config) { c.KubernetesRole = "k" }), "", ""},
		{"approle and kubernetes", valid(func(c *vaultstore.Config) { c.AppRoleRoleID, c.AppRoleSecretID, c.KubernetesRole = "r", "s", "k" }),
			"kubernetes.role", "not both"},
		{"kubernetes with a secret_id", valid(func(c *vaultstore.Config) { c.KubernetesRole, c.AppRoleSecretID = "k", "s" }), "kubernetes.role", "neither"},
		{"kubernetes without token file", valid(func(c *vaultstore.Config) { c.KubernetesRole, c.KubernetesTokenFile = "k", "" }),
			"kubernetes.token_file", "empty"},
		{"kubernetes without mount", valid(func(c *vaultstore.Config) { c.KubernetesRole, c.KubernetesMount = "k", "" }), "kubernetes.mount", "empty"},
		{"approle without secret_id", valid(func(c *vaultstore.Config) { c.AppRoleRoleID = "r" }), "approle.secret_id_file", "secret_id"},
		{"secret_id without role_id", valid(func(c *vaultstore.Config) { c.AppRoleSecretID = "s" }), "approle.role_id", "no role_id"},
		{"token twice", valid(func(c *vaultstore.Config) { c.TokenFile = "/run/token" }), "token_file", "not both"},
		{"no credentials", valid(func(c *vaultstore.Config) { c.Token = "" }), "token", "AppRole"},
		{"no timeout", valid(func(c *vaultstore.Config) { c.Timeout = 0 }), "timeout", "positive"},
		{"no max_conns", valid(func(c *vaultstore.Config) { c.MaxConns = 0 }), "max_conns", "positive"},
		{"transit without key", valid(func(c *vaultstore.Config) { c.Transit, c.TransitKey = true, "" }), "transit_key", "empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if tc.key == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			var ce *vaultstore.ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("err = %v, want a *ConfigError", err)
			}
			if ce.Key != tc.key || !strings.Contains(err.Error(), tc.message) {
				t.Fatalf("err = %v (key %q), want key %q and %q in the message", err, ce.Key, tc.key, tc.message)
			}
		})
	}
}

func TestConfigAuthMethod(t *testing.T) {
	c := vaultstore.DefaultConfig()
	if c.UsesAppRole() {
		t.Fatal("the default configuration uses AppRole")
	}
	c.AppRoleRoleIDFile = "/run/role_id"
	if !c.UsesAppRole() {
		t.Fatal("a role_id file does not select AppRole")
	}
	if c.UsesKubernetes() {
		t.Fatal("the default configuration uses Kubernetes auth")
	}
	c.KubernetesRole = "m2mguard"
	if !c.UsesKubernetes() {
		t.Fatal("a Kubernetes role does not select Kubernetes auth")
	}
}

package vaultstore

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Config is a Vault store's configuration as an operator writes it, each
// credential given as a value or as a file that holds it (the broker's
// store.vault keys are its fields). Validate checks it without touching
// Vault or the files; the caller reads the files and calls Open with the
// Options they make. DefaultConfig gives the defaults.
type Config struct {
	// Address of Vault, required. The broker puts $VAULT_ADDR here unless
	// the address is configured.
	Address string
	Mount   string // KV v2 mount
	Prefix  string // path below the mount
	// Token, or the file holding it (not both); the broker puts
	// $VAULT_TOKEN here. Ignored when AppRole is configured.
	Token     string
	TokenFile string
	CACert    string        // PEM file to verify Vault's TLS certificate; "" = system roots
	Timeout   time.Duration // per request
	MaxConns  int           // connections to Vault, open or idle (Options.MaxConns)

	// AppRole is used when a role_id is set (value or file), with one of
	// the secret_id (value or file) and a response-wrapping token of it
	// (value or file: AppRole.WrappingToken).
	AppRoleMount             string
	AppRoleRoleID            string
	AppRoleRoleIDFile        string
	AppRoleSecretID          string
	AppRoleSecretIDFile      string
	AppRoleWrappingToken     string
	AppRoleWrappingTokenFile string

	// Kubernetes auth is used when KubernetesRole is set (see Kubernetes).
	KubernetesMount     string
	KubernetesRole      string
	KubernetesTokenFile string

	// Transit issues session keys from Vault Transit (TransitKeys).
	Transit      bool
	TransitMount string
	TransitKey   string
}

// DefaultConfig returns the defaults of Config, which are also those of
// the zero Options, AppRole, Kubernetes and TransitKeys: KV v2 mount
// "secret", prefix "m2mguard", 5 s per request, DefaultMaxConns
// connections, AppRole mount "approle",
// Kubernetes mount "kubernetes" with the pod's service account token,
// Transit mount "transit" and key "m2mguard-session".
func DefaultConfig() Config {
	return Config{
		Mount: "secret", Prefix: "m2mguard", Timeout: 5 * time.Second, MaxConns: DefaultMaxConns,
		AppRoleMount:    "approle",
		KubernetesMount: "kubernetes", KubernetesTokenFile: DefaultServiceAccountTokenFile,
		TransitMount: "transit", TransitKey: "m2mguard-session",
	}
}

// UsesAppRole reports whether the configuration logs in with AppRole (a
// role_id is set).
func (c Config) UsesAppRole() bool {
	return c.AppRoleRoleID != "" || c.AppRoleRoleIDFile != ""
}

// UsesKubernetes reports whether the configuration logs in with the
// Kubernetes auth method (a role is set). Without either, it uses a token.
func (c Config) UsesKubernetes() bool { return c.KubernetesRole != "" }

// ConfigError is an invalid Config. Key names the field as the broker's
// configuration spells it below store.vault, e.g. "approle.role_id_file".
type ConfigError struct {
	Key string
	Err error
}

func (e *ConfigError) Error() string { return fmt.Sprintf("vaultstore: %s: %v", e.Key, e.Err) }

func (e *ConfigError) Unwrap() error { return e.Err }

// Validate checks the combination of fields: an http(s) address, a mount
// and a prefix, exactly one way to log in (Kubernetes auth with its mount
// and token file, AppRole with its role_id and one secret_id or wrapping
// token, or a token; Kubernetes or AppRole wins over a token inherited
// from $VAULT_TOKEN), a positive timeout and max_conns, and a Transit
// key when Transit is on. Errors are *ConfigError.
func (c Config) Validate() error {
	bad := func(key, msg string) error { return &ConfigError{Key: key, Err: errors.New(msg)} }
	if c.Address == "" {
		return bad("address", "required (or set $VAULT_ADDR)")
	}
	if !strings.HasPrefix(c.Address, "http://") && !strings.HasPrefix(c.Address, "https://") {
		return bad("address", "want an http:// or https:// URL")
	}
	if c.Mount == "" {
		return bad("mount", "must not be empty")
	}
	if c.Prefix == "" {
		return bad("prefix", "must not be empty")
	}
	approle, kube := c.UsesAppRole(), c.UsesKubernetes()
	secrets := 0 // ways the AppRole secret_id is given
	for _, v := range []string{c.AppRoleSecretID, c.AppRoleSecretIDFile, c.AppRoleWrappingToken, c.AppRoleWrappingTokenFile} {
		if v != "" {
			secrets++
		}
	}
	switch {
	case approle && kube:
		return bad("kubernetes.role", "set AppRole (approle.role_id) or Kubernetes auth (kubernetes.role), not both")
	case kube && secrets > 0:
		return bad("kubernetes.role", "an AppRole secret_id or wrapping token is set too: Kubernetes auth uses neither")
	case kube && c.KubernetesTokenFile == "":
		return bad("kubernetes.token_file", "must not be empty with kubernetes.role")
	case kube && c.KubernetesMount == "":
		return bad("kubernetes.mount", "must not be empty with kubernetes.role")
	case kube:
		// Kubernetes auth wins over a token inherited from $VAULT_TOKEN.
	case c.AppRoleRoleID != "" && c.AppRoleRoleIDFile != "":
		return bad("approle.role_id_file", "set role_id or role_id_file, not both")
	case secrets > 1:
		return bad("approle.secret_id_file", "set one of secret_id, secret_id_file, wrapping_token and wrapping_token_file")
	case approle && secrets == 0:
		return bad("approle.secret_id_file", "AppRole needs a secret_id (approle.secret_id_file, or approle.secret_id, e.g. from its environment variable) or a wrapping token of one (approle.wrapping_token_file)")
	case !approle && secrets > 0:
		return bad("approle.role_id", "a secret_id or wrapping token is set but no role_id")
	case approle:
		// AppRole wins over a token inherited from $VAULT_TOKEN.
	case c.Token != "" && c.TokenFile != "":
		return bad("token_file", "set token or token_file, not both")
	case c.Token == "" && c.TokenFile == "":
		return bad("token", "Vault needs a token (token, token_file, $VAULT_TOKEN), AppRole (approle.role_id and approle.secret_id or approle.wrapping_token_file) or Kubernetes auth (kubernetes.role)")
	}
	if c.Timeout <= 0 {
		return bad("timeout", "must be positive")
	}
	if c.MaxConns <= 0 {
		return bad("max_conns", "must be positive")
	}
	if c.Transit && c.TransitKey == "" {
		return bad("transit_key", "must not be empty with transit")
	}
	return nil
}

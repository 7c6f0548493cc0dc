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

	// AppRole is used when a role_id is set (value or file), with the
	// secret_id as a value or a file (not both of either).
	AppRoleMount        string
	AppRoleRoleID       string
	AppRoleRoleIDFile   string
	AppRoleSecretID     string
	AppRoleSecretIDFile string

	// Transit issues session keys from Vault Transit (TransitKeys).
	Transit      bool
	TransitMount string
	TransitKey   string
}

// DefaultConfig returns the defaults of Config, which are also those of
// the zero Options and TransitKeys: KV v2 mount "secret", prefix
// "m2mguard", 5 s per request, AppRole mount "approle", Transit mount
// "transit" and key "m2mguard-session".
func DefaultConfig() Config {
	return Config{
		Mount: "secret", Prefix: "m2mguard", Timeout: 5 * time.Second,
		AppRoleMount: "approle", TransitMount: "transit", TransitKey: "m2mguard-session",
	}
}

// UsesAppRole reports whether the configuration logs in with AppRole (a
// role_id is set); otherwise it uses a token.
func (c Config) UsesAppRole() bool {
	return c.AppRoleRoleID != "" || c.AppRoleRoleIDFile != ""
}

// ConfigError is an invalid Config. Key names the field as the broker's
// configuration spells it below store.vault, e.g. "approle.role_id_file".
type ConfigError struct {
	Key string
	Err error
}

func (e *ConfigError) Error() string { return fmt.Sprintf("vaultstore: %s: %v", e.Key, e.Err) }

func (e *ConfigError) Unwrap() error { return e.Err }

// Validate checks the combination of fields: an http(s) address, a mount
// and a prefix, exactly one way to log in (a token, or AppRole with both
// its ids), a positive timeout, and a Transit key when Transit is on.
// Errors are *ConfigError.
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
	approle := c.UsesAppRole()
	switch {
	case c.AppRoleRoleID != "" && c.AppRoleRoleIDFile != "":
		return bad("approle.role_id_file", "set role_id or role_id_file, not both")
	case c.AppRoleSecretID != "" && c.AppRoleSecretIDFile != "":
		return bad("approle.secret_id_file", "set secret_id or secret_id_file, not both")
	case approle && c.AppRoleSecretID == "" && c.AppRoleSecretIDFile == "":
		return bad("approle.secret_id_file", "AppRole needs a secret_id (approle.secret_id_file, or approle.secret_id, e.g. from its environment variable)")
	case !approle && (c.AppRoleSecretID != "" || c.AppRoleSecretIDFile != ""):
		return bad("approle.role_id", "a secret_id is set but no role_id")
	case approle:
		// AppRole wins over a token inherited from $VAULT_TOKEN.
	case c.Token != "" && c.TokenFile != "":
		return bad("token_file", "set token or token_file, not both")
	case c.Token == "" && c.TokenFile == "":
		return bad("token", "Vault needs a token (token, token_file, $VAULT_TOKEN) or AppRole (approle.role_id and approle.secret_id)")
	}
	if c.Timeout <= 0 {
		return bad("timeout", "must be positive")
	}
	if c.Transit && c.TransitKey == "" {
		return bad("transit_key", "must not be empty with transit")
	}
	return nil
}

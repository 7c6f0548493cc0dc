package broker

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"
)

// Config is the whole configuration of the broker. Build it with Default
// and then the layers of Resolve (YAML file, environment, flags), or fill it
// in code; Validate before Run.
type Config struct {
	// DataDir holds the embedded store, its master key and the generated
	// admin and metrics tokens (created 0700 on first run).
	DataDir string

	Log   LogConfig
	Store StoreConfig
	MQTT  MQTTConfig
	Admin AdminConfig
	Auth  AuthConfig
	Keys  KeysConfig
	Cache CacheConfig
	SMS   SMSConfig
}

// LogConfig is the log output (log/slog on stderr).
type LogConfig struct {
	Format string // text or json
	Level  string // debug, info, warn, error
}

// StoreConfig chooses where terminal records live.
type StoreConfig struct {
	Type     string // embedded or vault
	Embedded EmbeddedConfig
	Vault    VaultConfig
}

// EmbeddedConfig is the embedded (bbolt) store.
type EmbeddedConfig struct {
	File          string // "" = <data_dir>/m2mguard.db
	MasterKeyFile string // "" = <data_dir>/master.key; $M2MGUARD_MASTER_KEY wins
	Reseal        string // reseal code of a failed integrity check (boltstore.Options.Reseal)
}

// VaultConfig is the Vault KV v2 store.
type VaultConfig struct {
	Address   string
	Mount     string
	Prefix    string
	Token     string
	TokenFile string
	CACert    string
	Timeout   time.Duration

	AppRoleMount        string
	AppRoleRoleID       string
	AppRoleRoleIDFile   string
	AppRoleSecretID     string
	AppRoleSecretIDFile string

	Transit      bool
	TransitMount string
	TransitKey   string
}

// MQTTConfig are the MQTT listeners and mochi's per-client resources.
type MQTTConfig struct {
	TCP     string // "" or "off" = no listener
	TLS     string // used only when TLSCert and TLSKey are set
	TLSCert string
	TLSKey  string
	WS      string // "" or "off" = no listener

	ReadBuffer       int           // bytes per client
	WriteBuffer      int           // bytes per client
	MaxWritesPending int           // outbound queue length per client
	MaxPacketSize    int           // bytes; 0 = no limit
	SessionExpiry    time.Duration // how long mochi keeps the session of a disconnected client
	PublicURL        string

	// Persistence keeps sessions and retained messages across restarts
	// (package sessionstore): "on" (the file fsynced every second), "sync"
	// (fsynced at every commit) or "off".
	Persistence     string
	PersistenceFile string // "" = <data_dir>/sessions.db

	// netguard on every MQTT listener, their connections counted together
	ConnectTimeout  time.Duration
	WriteTimeout    time.Duration // a write to a client must finish within it, else the connection is closed
	MaxConnsPerAddr int
	MaxConns        int // 0 = no limit
}

// AdminConfig is the admin HTTP API.
type AdminConfig struct {
	Listen    string // "" or "off" = no admin API
	Token     string
	TokenFile string // "" = <data_dir>/admin.token

	// MetricsToken may read /metrics and nothing else (the admin token may
	// too): a Prometheus scraper holds no admin secret.
	MetricsToken     string
	MetricsTokenFile string // "" = <data_dir>/metrics.token
}

// AuthConfig tunes login checks (SPEC section 3).
type AuthConfig struct {
	Skew            time.Duration
	Grace           time.Duration
	SessionLifetime time.Duration
	StoreTimeout    time.Duration
	ThrottleFree    int
	ThrottleBase    time.Duration
	ThrottleMax     time.Duration

	// Budgets of application password verifications (argon2id), see
	// hook.AppLimitOptions; 0 = the hook's default.
	AppConcurrency        int
	AppConcurrencyPerAddr int
	AppRate               float64 // per second
	AppRatePerAddr        float64 // per second
	AppFailuresPerAddr    int
	AppFailureRefill      time.Duration
}

// KeysConfig are the lifetimes of generated credentials.
type KeysConfig struct {
	PasswordLifetime time.Duration // 0 = never expire
	KeyLifetime      time.Duration // 0 = never expire
	ChangeDeadline   time.Duration
}

// CacheConfig is the key service's read cache.
type CacheConfig struct {
	TTL        time.Duration
	MaxStale   time.Duration
	MaxEntries int
}

// SMSConfig is the SMS gateway for credential changes in plaintext.
type SMSConfig struct {
	URL        string // "" = no SMS channel
	AuthHeader string
	AuthValue  string
	Retries    int
	// OnRequest honours a terminal's request for a change by SMS even when
	// ciphertext is possible (the new values then cross the SMS bearer in
	// plaintext); off by default.
	OnRequest bool
}

// The tuned mochi per-client resources (see README, "Memory per client").
const (
	DefaultReadBuffer       = 1024
	DefaultWriteBuffer      = 1024
	DefaultMaxWritesPending = 256
)

// Default returns the configuration used when nothing is configured.
func Default() *Config {
	c := &Config{DataDir: "./data"}
	c.Log = LogConfig{Format: "text", Level: "info"}
	c.Store.Type = "embedded"
	c.Store.Vault = VaultConfig{
		Mount: "secret", Prefix: "m2mguard", Timeout: 5 * time.Second,
		AppRoleMount: "approle", TransitMount: "transit", TransitKey: "m2mguard-session",
	}
	c.MQTT = MQTTConfig{
		TCP: ":1883", TLS: ":8883", WS: ":8083",
		ReadBuffer: DefaultReadBuffer, WriteBuffer: DefaultWriteBuffer,
		MaxWritesPending: DefaultMaxWritesPending, MaxPacketSize: 1 << 20, SessionExpiry: 7 * 24 * time.Hour,
		Persistence:    "on",
		ConnectTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second, MaxConnsPerAddr: 256,
	}
	c.Admin.Listen = "127.0.0.1:8080"
	c.Auth = AuthConfig{
		Skew: 300 * time.Second, Grace: 7 * 24 * time.Hour, SessionLifetime: 24 * time.Hour,
		StoreTimeout: 2 * time.Second, ThrottleFree: 5, ThrottleBase: time.Second, ThrottleMax: 15 * time.Minute,
		AppConcurrencyPerAddr: 1, AppRatePerAddr: 2, AppFailuresPerAddr: 20, AppFailureRefill: 10 * time.Second,
	}
	c.Keys.ChangeDeadline = 24 * time.Hour
	c.Cache = CacheConfig{TTL: 30 * time.Second, MaxStale: 10 * time.Minute, MaxEntries: 100000}
	c.SMS.Retries = 3
	return c
}

// ConfigError is a configuration error; Key names the offending key as it
// is written in the YAML file, Source says where the value came from.
type ConfigError struct {
	Key    string // e.g. "store.vault.address"
	Source string // "config file x.yaml", "env M2MGUARD_...", "flag --..."; "" when the combination is wrong
	Err    error
}

func (e *ConfigError) Error() string {
	if e.Source != "" {
		return fmt.Sprintf("config key %s (%s): %v", e.Key, e.Source, e.Err)
	}
	return fmt.Sprintf("config key %s: %v", e.Key, e.Err)
}

func (e *ConfigError) Unwrap() error { return e.Err }

// Field describes one configuration key: its YAML key, environment
// variable and flag are derived from one name.
type Field struct {
	Key     string // YAML key, dotted: store.vault.address
	Help    string
	Default string // as documented
	Secret  bool   // never printed
	set     func(c *Config, v string) error
}

// Env is the environment variable of the key: M2MGUARD_ + the key in upper
// case with "." as "_".
func (f Field) Env() string {
	return "M2MGUARD_" + strings.ToUpper(strings.NewReplacer(".", "_", "-", "_").Replace(f.Key))
}

// Flag is the command-line flag of the key: the key with "." and "_" as "-".
func (f Field) Flag() string {
	return strings.NewReplacer(".", "-", "_", "-").Replace(f.Key)
}

func str(p func(*Config) *string) func(*Config, string) error {
	return func(c *Config, v string) error { *p(c) = v; return nil }
}

func oneOf(p func(*Config) *string, allowed ...string) func(*Config, string) error {
	return func(c *Config, v string) error {
		v = strings.ToLower(strings.TrimSpace(v))
		for _, a := range allowed {
			if v == a {
				*p(c) = v
				return nil
			}
		}
		return fmt.Errorf("want one of %s", strings.Join(allowed, ", "))
	}
}

func dur(p func(*Config) *time.Duration) func(*Config, string) error {
	return func(c *Config, v string) error {
		d, err := time.ParseDuration(strings.TrimSpace(v))
		if err != nil {
			return errors.New("want a duration such as 30s, 5m or 24h")
		}
		if d < 0 {
			return errors.New("must not be negative")
		}
		*p(c) = d
		return nil
	}
}

func integer(p func(*Config) *int, min, max int) func(*Config, string) error {
	return func(c *Config, v string) error {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil {
			return errors.New("want an integer")
		}
		if n < min || n > max {
			return fmt.Errorf("want %d to %d", min, max)
		}
		*p(c) = n
		return nil
	}
}

func number(p func(*Config) *float64, min, max float64) func(*Config, string) error {
	return func(c *Config, v string) error {
		n, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || math.IsNaN(n) {
			return errors.New("want a number")
		}
		if n < min || n > max {
			return fmt.Errorf("want %g to %g", min, max)
		}
		*p(c) = n
		return nil
	}
}

func boolean(p func(*Config) *bool) func(*Config, string) error {
	return func(c *Config, v string) error {
		b, err := strconv.ParseBool(strings.TrimSpace(v))
		if err != nil {
			return errors.New("want true or false")
		}
		*p(c) = b
		return nil
	}
}

func addr(p func(*Config) *string) func(*Config, string) error {
	return func(c *Config, v string) error {
		v = strings.TrimSpace(v)
		if v == "" || v == "off" {
			*p(c) = ""
			return nil
		}
		if _, port, err := net.SplitHostPort(v); err != nil {
			return errors.New(`want host:port, :port or "off"`)
		} else if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
			return errors.New("want a port number 0-65535")
		}
		*p(c) = v
		return nil
	}
}

// Fields lists every configuration key, in documentation order.
func Fields() []Field {
	return fields
}

var fields = []Field{
	{Key: "data_dir", Default: "./data", Help: "directory of the embedded store, its master key, the generated admin and metrics tokens, the replay guard's claims (replay/) and the session store (sessions.db); created 0700",
		set: str(func(c *Config) *string { return &c.DataDir })},
	{Key: "log.format", Default: "text", Help: "log format: text or json (stderr)",
		set: oneOf(func(c *Config) *string { return &c.Log.Format }, "text", "json")},
	{Key: "log.level", Default: "info", Help: "log level: debug, info, warn or error",
		set: oneOf(func(c *Config) *string { return &c.Log.Level }, "debug", "info", "warn", "error")},

	{Key: "store.type", Default: "embedded", Help: "where terminal records live: embedded (encrypted file in data_dir) or vault",
		set: oneOf(func(c *Config) *string { return &c.Store.Type }, "embedded", "vault")},
	{Key: "store.embedded.file", Default: "<data_dir>/m2mguard.db", Help: "embedded store file",
		set: str(func(c *Config) *string { return &c.Store.Embedded.File })},
	{Key: "store.embedded.master_key_file", Default: "<data_dir>/master.key", Help: "master key file (32 random bytes, created 0600 on first run); $M2MGUARD_MASTER_KEY (base64) takes precedence; it also seals the session store (mqtt.persistence), whatever the store type",
		set: str(func(c *Config) *string { return &c.Store.Embedded.MasterKeyFile })},
	{Key: "store.embedded.reseal", Help: "reseal code printed when the embedded store fails its integrity check (records rolled back or changed outside m2mguard): accepts the records exactly as they are then; set it once, only after checking them (SECURITY.md)",
		set: str(func(c *Config) *string { return &c.Store.Embedded.Reseal })},
	{Key: "store.vault.address", Default: "$VAULT_ADDR", Help: "Vault address, e.g. https://vault:8200",
		set: str(func(c *Config) *string { return &c.Store.Vault.Address })},
	{Key: "store.vault.mount", Default: "secret", Help: "KV v2 mount",
		set: str(func(c *Config) *string { return &c.Store.Vault.Mount })},
	{Key: "store.vault.prefix", Default: "m2mguard", Help: "path below the mount",
		set: str(func(c *Config) *string { return &c.Store.Vault.Prefix })},
	{Key: "store.vault.token", Default: "$VAULT_TOKEN", Secret: true, Help: "Vault token (prefer token_file or AppRole)",
		set: str(func(c *Config) *string { return &c.Store.Vault.Token })},
	{Key: "store.vault.token_file", Help: "file holding the Vault token",
		set: str(func(c *Config) *string { return &c.Store.Vault.TokenFile })},
	{Key: "store.vault.ca_cert", Help: "PEM file to verify Vault's TLS certificate (default: system roots)",
		set: str(func(c *Config) *string { return &c.Store.Vault.CACert })},
	{Key: "store.vault.timeout", Default: "5s", Help: "per-request timeout",
		set: dur(func(c *Config) *time.Duration { return &c.Store.Vault.Timeout })},
	{Key: "store.vault.approle.mount", Default: "approle", Help: "AppRole auth mount",
		set: str(func(c *Config) *string { return &c.Store.Vault.AppRoleMount })},
	{Key: "store.vault.approle.role_id", Help: "AppRole role_id (AppRole is used when a role_id is set)",
		set: str(func(c *Config) *string { return &c.Store.Vault.AppRoleRoleID })},
	{Key: "store.vault.approle.role_id_file", Help: "file holding the AppRole role_id",
		set: str(func(c *Config) *string { return &c.Store.Vault.AppRoleRoleIDFile })},
	{Key: "store.vault.approle.secret_id", Secret: true, Help: "AppRole secret_id (prefer secret_id_file or the env var)",
		set: str(func(c *Config) *string { return &c.Store.Vault.AppRoleSecretID })},
	{Key: "store.vault.approle.secret_id_file", Help: "file holding the AppRole secret_id",
		set: str(func(c *Config) *string { return &c.Store.Vault.AppRoleSecretIDFile })},
	{Key: "store.vault.transit", Default: "false", Help: "issue session keys from Vault Transit (every key an audit-log entry)",
		set: boolean(func(c *Config) *bool { return &c.Store.Vault.Transit })},
	{Key: "store.vault.transit_mount", Default: "transit", Help: "Transit mount",
		set: str(func(c *Config) *string { return &c.Store.Vault.TransitMount })},
	{Key: "store.vault.transit_key", Default: "m2mguard-session", Help: "Transit key (type aes256-gcm96)",
		set: str(func(c *Config) *string { return &c.Store.Vault.TransitKey })},

	{Key: "mqtt.tcp", Default: ":1883", Help: `MQTT over TCP listen address ("off" = none)`,
		set: addr(func(c *Config) *string { return &c.MQTT.TCP })},
	{Key: "mqtt.tls", Default: ":8883", Help: "MQTT over TLS listen address; active only when tls_cert and tls_key are set",
		set: addr(func(c *Config) *string { return &c.MQTT.TLS })},
	{Key: "mqtt.tls_cert", Help: "PEM certificate (chain) of the TLS and WebSocket listeners",
		set: str(func(c *Config) *string { return &c.MQTT.TLSCert })},
	{Key: "mqtt.tls_key", Help: "PEM private key of the TLS and WebSocket listeners",
		set: str(func(c *Config) *string { return &c.MQTT.TLSKey })},
	{Key: "mqtt.ws", Default: ":8083", Help: `MQTT over WebSocket listen address, any path (ws://host:8083/mqtt; wss:// when tls_cert is set; "off" = none)`,
		set: addr(func(c *Config) *string { return &c.MQTT.WS })},
	{Key: "mqtt.read_buffer", Default: strconv.Itoa(DefaultReadBuffer), Help: "read buffer per client, bytes (mochi default 2048)",
		set: integer(func(c *Config) *int { return &c.MQTT.ReadBuffer }, 256, 1<<20)},
	{Key: "mqtt.write_buffer", Default: strconv.Itoa(DefaultWriteBuffer), Help: "write buffer per client, bytes (mochi default 2048)",
		set: integer(func(c *Config) *int { return &c.MQTT.WriteBuffer }, 256, 1<<20)},
	{Key: "mqtt.max_writes_pending", Default: strconv.Itoa(DefaultMaxWritesPending), Help: "outbound queue per client, messages; allocated up front, 8 bytes each (mochi default 8192)",
		set: integer(func(c *Config) *int { return &c.MQTT.MaxWritesPending }, 16, 1<<16)},
	{Key: "mqtt.session_expiry", Default: "168h0m0s", Help: "how long the session (subscriptions, queued QoS 1 messages) of a disconnected client is kept; mochi's default is forever",
		set: dur(func(c *Config) *time.Duration { return &c.MQTT.SessionExpiry })},
	{Key: "mqtt.persistence", Default: "on", Help: "keep persistent sessions (subscriptions, queued and unacknowledged QoS 1/2 messages) and retained messages across restarts, sealed under the master key in persistence_file: on (fsync every second: kill -9 loses nothing acknowledged, a power loss at most the last second), sync (fsync every commit: a power loss loses nothing acknowledged; slower) or off",
		set: oneOf(func(c *Config) *string { return &c.MQTT.Persistence }, "on", "sync", "off")},
	{Key: "mqtt.persistence_file", Default: "<data_dir>/sessions.db", Help: "session store file (created 0600)",
		set: str(func(c *Config) *string { return &c.MQTT.PersistenceFile })},
	{Key: "mqtt.max_packet_size", Default: "1048576", Help: "largest MQTT packet accepted, bytes (0 = no limit)",
		set: integer(func(c *Config) *int { return &c.MQTT.MaxPacketSize }, 0, 256<<20)},
	{Key: "mqtt.connect_timeout", Default: "10s", Help: "a new connection (TCP, TLS or WebSocket) must send its CONNECT within this (slow-loris guard); a WebSocket gets it once for the HTTP upgrade and once for the CONNECT",
		set: dur(func(c *Config) *time.Duration { return &c.MQTT.ConnectTimeout })},
	{Key: "mqtt.write_timeout", Default: "10s", Help: "every write to a client must finish within this, else its connection is closed (a client that stops reading)",
		set: dur(func(c *Config) *time.Duration { return &c.MQTT.WriteTimeout })},
	{Key: "mqtt.max_conns_per_addr", Default: "256", Help: "open connections from one IP address, all MQTT listeners together; more are closed at once",
		set: integer(func(c *Config) *int { return &c.MQTT.MaxConnsPerAddr }, 1, 1<<24)},
	{Key: "mqtt.max_conns", Default: "0", Help: "open connections in all, all MQTT listeners together (0 = no limit)",
		set: integer(func(c *Config) *int { return &c.MQTT.MaxConns }, 0, 1<<30)},
	{Key: "mqtt.public_url", Default: "tcp://<hostname>:<tcp port>", Help: "broker URL written into provisioning bundles (m2mctl terminal add)",
		set: str(func(c *Config) *string { return &c.MQTT.PublicURL })},

	{Key: "admin.listen", Default: "127.0.0.1:8080", Help: `admin HTTP API listen address ("off" = none); keep it on loopback or a private network`,
		set: addr(func(c *Config) *string { return &c.Admin.Listen })},
	{Key: "admin.token", Secret: true, Help: "admin bearer token (at least 16 characters); default: read from token_file, generated there on first run",
		set: str(func(c *Config) *string { return &c.Admin.Token })},
	{Key: "admin.token_file", Default: "<data_dir>/admin.token", Help: "file of the admin bearer token (created 0600 on first run)",
		set: str(func(c *Config) *string { return &c.Admin.TokenFile })},
	{Key: "admin.metrics_token", Secret: true, Help: "bearer token that may read /metrics and nothing else (at least 16 characters; the admin token is accepted too); default: read from metrics_token_file, generated there on first run",
		set: str(func(c *Config) *string { return &c.Admin.MetricsToken })},
	{Key: "admin.metrics_token_file", Default: "<data_dir>/metrics.token", Help: "file of the metrics bearer token (created 0600 on first run); give it to Prometheus as credentials_file",
		set: str(func(c *Config) *string { return &c.Admin.MetricsTokenFile })},

	{Key: "auth.skew", Default: "5m0s", Help: "allowed |now - ts| at login",
		set: dur(func(c *Config) *time.Duration { return &c.Auth.Skew })},
	{Key: "auth.grace", Default: "168h0m0s", Help: "logins still allowed this long after up expired (a change starts at once)",
		set: dur(func(c *Config) *time.Duration { return &c.Auth.Grace })},
	{Key: "auth.session_lifetime", Default: "24h0m0s", Help: "life of a session key; the session ends then",
		set: dur(func(c *Config) *time.Duration { return &c.Auth.SessionLifetime })},
	{Key: "auth.store_timeout", Default: "2s", Help: "timeout of one key-service call during a login",
		set: dur(func(c *Config) *time.Duration { return &c.Auth.StoreTimeout })},
	{Key: "auth.throttle_free", Default: "5", Help: "failed logins of one sn from one address answered before refusals start",
		set: integer(func(c *Config) *int { return &c.Auth.ThrottleFree }, 1, 1000)},
	{Key: "auth.throttle_base", Default: "1s", Help: "first refusal period; doubles with every further failure",
		set: dur(func(c *Config) *time.Duration { return &c.Auth.ThrottleBase })},
	{Key: "auth.throttle_max", Default: "15m0s", Help: "longest refusal period",
		set: dur(func(c *Config) *time.Duration { return &c.Auth.ThrottleMax })},
	{Key: "auth.app_concurrency", Default: "0", Help: "application password verifications (argon2id, 19 MiB each) running at once; more logins are refused at once with 0x89 server busy (0 = half the CPUs, at least 1)",
		set: integer(func(c *Config) *int { return &c.Auth.AppConcurrency }, 0, 1<<16)},
	{Key: "auth.app_concurrency_per_addr", Default: "1", Help: "application password verifications running at once for one address (an IPv4 address or an IPv6 /64)",
		set: integer(func(c *Config) *int { return &c.Auth.AppConcurrencyPerAddr }, 1, 1<<16)},
	{Key: "auth.app_rate", Default: "0", Help: "application password verifications started per second, all addresses (bursts of two seconds' worth); 0 = 10 × app_concurrency",
		set: number(func(c *Config) *float64 { return &c.Auth.AppRate }, 0, 1e6)},
	{Key: "auth.app_rate_per_addr", Default: "2", Help: "application password verifications started per second for one address",
		set: number(func(c *Config) *float64 { return &c.Auth.AppRatePerAddr }, 0.001, 1e6)},
	{Key: "auth.app_failures_per_addr", Default: "20", Help: "failed application logins from one address, whatever the names, before that address is refused (0x8A)",
		set: integer(func(c *Config) *int { return &c.Auth.AppFailuresPerAddr }, 1, 1<<20)},
	{Key: "auth.app_failure_refill", Default: "10s", Help: "after app_failures_per_addr, one more failed application login is allowed per address every this long",
		set: dur(func(c *Config) *time.Duration { return &c.Auth.AppFailureRefill })},

	{Key: "keys.password_lifetime", Default: "0s", Help: "life of generated access passwords (0 = never expire)",
		set: dur(func(c *Config) *time.Duration { return &c.Keys.PasswordLifetime })},
	{Key: "keys.key_lifetime", Default: "0s", Help: "life of generated basic keys (0 = never expire)",
		set: dur(func(c *Config) *time.Duration { return &c.Keys.KeyLifetime })},
	{Key: "keys.change_deadline", Default: "24h0m0s", Help: "how long a credential change waits for its commit",
		set: dur(func(c *Config) *time.Duration { return &c.Keys.ChangeDeadline })},

	{Key: "cache.ttl", Default: "30s", Help: "terminal records are served from cache this long",
		set: dur(func(c *Config) *time.Duration { return &c.Cache.TTL })},
	{Key: "cache.max_stale", Default: "10m0s", Help: "known terminals still log in this long while the store is unavailable",
		set: dur(func(c *Config) *time.Duration { return &c.Cache.MaxStale })},
	{Key: "cache.max_entries", Default: "100000", Help: "cached terminal records",
		set: integer(func(c *Config) *int { return &c.Cache.MaxEntries }, 1, 100_000_000)},

	{Key: "sms.url", Help: `SMS gateway send endpoint (POST {"to","text"}); empty = no SMS channel`,
		set: str(func(c *Config) *string { return &c.SMS.URL })},
	{Key: "sms.auth_header", Help: "request header for the gateway, e.g. Authorization",
		set: str(func(c *Config) *string { return &c.SMS.AuthHeader })},
	{Key: "sms.auth_value", Secret: true, Help: "value of that header",
		set: str(func(c *Config) *string { return &c.SMS.AuthValue })},
	{Key: "sms.retries", Default: "3", Help: "retries of a failed gateway request",
		set: integer(func(c *Config) *int { return &c.SMS.Retries }, 0, 100)},
	{Key: "sms.on_request", Default: "false", Help: "send a change by SMS when the terminal asks for it although ciphertext is possible (the new values then cross the SMS bearer in plaintext); off: SMS only when the basic key is not in sync",
		set: boolean(func(c *Config) *bool { return &c.SMS.OnRequest })},
}

func fieldByKey(key string) (Field, bool) {
	for _, f := range fields {
		if f.Key == key {
			return f, true
		}
	}
	return Field{}, false
}

// EnvConfig names the environment variable of the config file path.
const EnvConfig = "M2MGUARD_CONFIG"

// maxConfigSize bounds the YAML file.
const maxConfigSize = 1 << 20

// ApplyYAML sets the keys of a YAML document on c. source names the file in
// errors. Unknown keys, lists and aliases are errors that name the key.
func (c *Config) ApplyYAML(data []byte, source string) error {
	if len(data) > maxConfigSize {
		return &ConfigError{Key: "(file)", Source: source, Err: errors.New("larger than 1 MiB")}
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return &ConfigError{Key: "(file)", Source: source, Err: fmt.Errorf("not valid YAML: %v", err)}
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
		return &ConfigError{Key: "(file)", Source: source, Err: errors.New("want one YAML document")}
	}
	root := doc.Content[0]
	if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
		return nil
	}
	return c.applyNode(root, "", source)
}

func (c *Config) applyNode(n *yaml.Node, prefix, source string) error {
	at := fmt.Sprintf("%s line %d", source, n.Line)
	if n.Kind != yaml.MappingNode {
		key := prefix
		if key == "" {
			key = "(file)"
		}
		return &ConfigError{Key: key, Source: at, Err: errors.New("want a mapping of keys")}
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			return &ConfigError{Key: prefix + "?", Source: at, Err: errors.New("keys must be plain names")}
		}
		if k.Value == "" {
			key := prefix
			if key == "" {
				key = "(file)"
			}
			return &ConfigError{Key: key, Source: fmt.Sprintf("%s line %d", source, k.Line), Err: errors.New("empty key name")}
		}
		key := k.Value
		if prefix != "" {
			key = prefix + "." + k.Value
		}
		src := fmt.Sprintf("%s line %d", source, k.Line)
		switch v.Kind {
		case yaml.MappingNode:
			if err := c.applyNode(v, key, source); err != nil {
				return err
			}
		case yaml.ScalarNode:
			f, ok := fieldByKey(key)
			if !ok {
				return &ConfigError{Key: key, Source: src, Err: errors.New("unknown key")}
			}
			val := v.Value
			if v.Tag == "!!null" {
				val = ""
			}
			if err := f.set(c, val); err != nil {
				return &ConfigError{Key: key, Source: src, Err: err}
			}
		default:
			return &ConfigError{Key: key, Source: src, Err: errors.New("want a single value (no lists, no aliases)")}
		}
	}
	return nil
}

// ApplyEnv sets every key whose environment variable is set (and not
// empty). lookup is os.LookupEnv in the program.
func (c *Config) ApplyEnv(lookup func(string) (string, bool)) error {
	for _, f := range fields {
		if v, ok := lookup(f.Env()); ok && v != "" {
			if err := f.set(c, v); err != nil {
				return &ConfigError{Key: f.Key, Source: "env " + f.Env(), Err: err}
			}
		}
	}
	return nil
}

// AddFlags adds a flag for every key, plus --config, to fs.
func AddFlags(fs *pflag.FlagSet) {
	fs.StringP("config", "c", "", "YAML configuration file [$"+EnvConfig+"]")
	for _, f := range fields {
		help := f.Help + " [$" + f.Env() + "]"
		if f.Default != "" {
			help += " (default " + f.Default + ")"
		}
		fs.String(f.Flag(), "", help)
	}
}

// ApplyFlags sets the keys whose flags were given on the command line.
func (c *Config) ApplyFlags(fs *pflag.FlagSet) error {
	var err error
	for _, f := range fields {
		fl := fs.Lookup(f.Flag())
		if fl == nil || !fl.Changed || err != nil {
			continue
		}
		if e := f.set(c, fl.Value.String()); e != nil {
			err = &ConfigError{Key: f.Key, Source: "flag --" + f.Flag(), Err: e}
		}
	}
	return err
}

// Resolve builds the configuration from its layers, each overriding the one
// before: defaults, the YAML file (--config, else $M2MGUARD_CONFIG; none if
// neither), environment variables, flags. Then it validates the result.
// fs must have been set up with AddFlags and parsed.
func Resolve(fs *pflag.FlagSet, lookup func(string) (string, bool)) (*Config, error) {
	c := Default()
	if v, ok := lookup("VAULT_ADDR"); ok {
		c.Store.Vault.Address = v
	}
	if v, ok := lookup("VAULT_TOKEN"); ok {
		c.Store.Vault.Token = v
	}
	path, _ := fs.GetString("config")
	src := "flag --config"
	if path == "" {
		path, _ = lookup(EnvConfig)
		src = "env " + EnvConfig
	}
	if path != "" {
		data, err := readBounded(path)
		if err != nil {
			return nil, &ConfigError{Key: "(file)", Source: src, Err: err}
		}
		if err := c.ApplyYAML(data, "config file "+path); err != nil {
			return nil, err
		}
	}
	if err := c.ApplyEnv(lookup); err != nil {
		return nil, err
	}
	if err := c.ApplyFlags(fs); err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxConfigSize {
		return nil, errors.New("larger than 1 MiB")
	}
	return data, nil
}

// Validate checks the combination of keys and fills in the paths that
// default to the data directory. Errors are *ConfigError naming the key.
func (c *Config) Validate() error {
	bad := func(key, format string, a ...any) error {
		return &ConfigError{Key: key, Err: fmt.Errorf(format, a...)}
	}
	if c.DataDir == "" {
		return bad("data_dir", "must not be empty")
	}
	if c.Store.Embedded.File == "" {
		c.Store.Embedded.File = filepath.Join(c.DataDir, "m2mguard.db")
	}
	if c.Store.Embedded.MasterKeyFile == "" {
		c.Store.Embedded.MasterKeyFile = filepath.Join(c.DataDir, "master.key")
	}
	if c.Admin.TokenFile == "" {
		c.Admin.TokenFile = filepath.Join(c.DataDir, "admin.token")
	}
	if c.MQTT.PersistenceFile == "" {
		c.MQTT.PersistenceFile = filepath.Join(c.DataDir, "sessions.db")
	}
	if c.Admin.MetricsTokenFile == "" {
		c.Admin.MetricsTokenFile = filepath.Join(c.DataDir, "metrics.token")
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		return bad("log.format", "want text or json")
	}
	switch c.MQTT.Persistence {
	case "":
		c.MQTT.Persistence = "on"
	case "on", "sync", "off":
	default:
		return bad("mqtt.persistence", "want on, sync or off")
	}
	if _, err := parseLevel(c.Log.Level); err != nil {
		return bad("log.level", "want debug, info, warn or error")
	}
	switch c.Store.Type {
	case "embedded":
	case "vault":
		v := c.Store.Vault
		if v.Address == "" {
			return bad("store.vault.address", "required with store.type vault (or set $VAULT_ADDR)")
		}
		if !strings.HasPrefix(v.Address, "http://") && !strings.HasPrefix(v.Address, "https://") {
			return bad("store.vault.address", "want an http:// or https:// URL")
		}
		if v.Mount == "" {
			return bad("store.vault.mount", "must not be empty")
		}
		if v.Prefix == "" {
			return bad("store.vault.prefix", "must not be empty")
		}
		approle := v.AppRoleRoleID != "" || v.AppRoleRoleIDFile != ""
		token := v.Token != "" || v.TokenFile != ""
		switch {
		case v.AppRoleRoleID != "" && v.AppRoleRoleIDFile != "":
			return bad("store.vault.approle.role_id_file", "set role_id or role_id_file, not both")
		case v.AppRoleSecretID != "" && v.AppRoleSecretIDFile != "":
			return bad("store.vault.approle.secret_id_file", "set secret_id or secret_id_file, not both")
		case approle && v.AppRoleSecretID == "" && v.AppRoleSecretIDFile == "":
			return bad("store.vault.approle.secret_id_file", "AppRole needs a secret_id (secret_id_file or $M2MGUARD_STORE_VAULT_APPROLE_SECRET_ID)")
		case !approle && (v.AppRoleSecretID != "" || v.AppRoleSecretIDFile != ""):
			return bad("store.vault.approle.role_id", "a secret_id is set but no role_id")
		case approle:
			// AppRole wins over a token inherited from $VAULT_TOKEN.
		case v.Token != "" && v.TokenFile != "":
			return bad("store.vault.token_file", "set token or token_file, not both")
		case !token:
			return bad("store.vault.token", "store.type vault needs a token (token, token_file, $VAULT_TOKEN) or AppRole (approle.role_id and approle.secret_id)")
		}
		if v.Timeout <= 0 {
			return bad("store.vault.timeout", "must be positive")
		}
		if v.Transit && v.TransitKey == "" {
			return bad("store.vault.transit_key", "must not be empty with store.vault.transit")
		}
	default:
		return bad("store.type", "want embedded or vault")
	}
	if (c.MQTT.TLSCert == "") != (c.MQTT.TLSKey == "") {
		if c.MQTT.TLSCert == "" {
			return bad("mqtt.tls_cert", "set together with mqtt.tls_key")
		}
		return bad("mqtt.tls_key", "set together with mqtt.tls_cert")
	}
	if c.MQTT.TCP == "" && c.MQTT.WS == "" && (c.MQTT.TLS == "" || c.MQTT.TLSCert == "") {
		return bad("mqtt.tcp", "no MQTT listener is enabled (mqtt.tcp, mqtt.tls with a certificate, or mqtt.ws)")
	}
	for _, l := range [][2]string{{"mqtt.tcp", c.MQTT.TCP}, {"mqtt.tls", c.MQTT.TLS}, {"mqtt.ws", c.MQTT.WS}, {"admin.listen", c.Admin.Listen}} {
		if err := addr(func(*Config) *string { s := l[1]; return &s })(c, l[1]); err != nil {
			return bad(l[0], "%v", err)
		}
	}
	if c.MQTT.ReadBuffer < 256 {
		return bad("mqtt.read_buffer", "at least 256")
	}
	if c.MQTT.WriteBuffer < 256 {
		return bad("mqtt.write_buffer", "at least 256")
	}
	if c.MQTT.MaxWritesPending < 16 {
		return bad("mqtt.max_writes_pending", "at least 16")
	}
	if c.Admin.Token != "" && len(c.Admin.Token) < 16 {
		return bad("admin.token", "at least 16 characters")
	}
	if c.Admin.MetricsToken != "" && len(c.Admin.MetricsToken) < 16 {
		return bad("admin.metrics_token", "at least 16 characters")
	}
	if c.SMS.URL != "" && !strings.HasPrefix(c.SMS.URL, "http://") && !strings.HasPrefix(c.SMS.URL, "https://") {
		return bad("sms.url", "want an http:// or https:// URL")
	}
	if (c.SMS.AuthHeader == "") != (c.SMS.AuthValue == "") {
		return bad("sms.auth_value", "set sms.auth_header and sms.auth_value together")
	}
	for _, d := range []struct {
		key string
		v   time.Duration
	}{{"auth.skew", c.Auth.Skew}, {"auth.session_lifetime", c.Auth.SessionLifetime}, {"auth.store_timeout", c.Auth.StoreTimeout},
		{"auth.throttle_base", c.Auth.ThrottleBase}, {"auth.throttle_max", c.Auth.ThrottleMax}, {"auth.app_failure_refill", c.Auth.AppFailureRefill},
		{"keys.change_deadline", c.Keys.ChangeDeadline},
		{"cache.ttl", c.Cache.TTL}, {"mqtt.connect_timeout", c.MQTT.ConnectTimeout}, {"mqtt.write_timeout", c.MQTT.WriteTimeout}, {"mqtt.session_expiry", c.MQTT.SessionExpiry}} {
		if d.v <= 0 {
			return bad(d.key, "must be positive")
		}
	}
	if c.Auth.ThrottleMax < c.Auth.ThrottleBase {
		return bad("auth.throttle_max", "must be at least auth.throttle_base")
	}
	return nil
}

// Reference renders the configuration reference as a Markdown table (the
// README's, and what `m2mguard-broker --help` prints as text).
func Reference() string {
	var b strings.Builder
	b.WriteString("| key | env | flag | default | meaning |\n|---|---|---|---|---|\n")
	for _, f := range fields {
		fmt.Fprintf(&b, "| `%s` | `%s` | `--%s` | %s | %s |\n", f.Key, f.Env(), f.Flag(), mdDefault(f.Default), strings.ReplaceAll(f.Help, "|", "\\|"))
	}
	return b.String()
}

func mdDefault(d string) string {
	if d == "" {
		return ""
	}
	return "`" + d + "`"
}

// Keys returns every configuration key, sorted (for tests and tools).
func Keys() []string {
	out := make([]string, len(fields))
	for i, f := range fields {
		out[i] = f.Key
	}
	sort.Strings(out)
	return out
}

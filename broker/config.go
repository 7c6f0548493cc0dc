package broker

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"

	"github.com/m2mguard/m2mguard/campaign"
	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/fleetroute"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
	"github.com/m2mguard/m2mguard/netguard"
	"github.com/m2mguard/m2mguard/sms"
)

// Config is the whole configuration of the broker. Build it with Default
// and then the layers of Resolve (YAML file, environment, flags), or fill it
// in code; Start derives what is left empty (Derive) and validates it.
type Config struct {
	// DataDir holds the embedded store, its master key and the generated
	// admin and metrics tokens (created 0700 on first run).
	DataDir string

	Log       LogConfig
	Store     StoreConfig
	MQTT      MQTTConfig
	Admin     AdminConfig
	Auth      AuthConfig
	Keys      KeysConfig
	Cache     CacheConfig
	SMS       SMSConfig
	Events    EventsConfig
	Campaigns CampaignsConfig
	// Cluster is fleet mode: off unless it names NATS servers or an
	// embedded NATS node.
	Cluster ClusterConfig
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

// VaultConfig is the Vault KV v2 store: package vaultstore defines it
// (its defaults, its rules) and the broker reads it from the store.vault
// keys.
type VaultConfig = vaultstore.Config

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

	// ProxyProtocolTrusted are the load balancers' networks: connections
	// from them must start with a PROXY protocol header naming the client
	// (netguard.Options.TrustedProxies); empty = the PROXY protocol is off.
	ProxyProtocolTrusted []netip.Prefix
}

// AdminConfig is the admin HTTP API.
type AdminConfig struct {
	Listen    string // "" or "off" = no admin API
	Token     string
	TokenFile string // "" = <data_dir>/admin.token
	// TokensFile names operators: name, role (full or read) and the
	// SHA-256 of each one's token (admin.ParseOperators); "" = none.
	TokensFile string

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
	// ThrottleMaxEntries bounds the throttle table ((sn or application
	// name, address) pairs); m2mguard_throttle_max_entries exports it.
	ThrottleMaxEntries int

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
	URL           string // "" = no SMS channel
	AuthHeader    string
	AuthValue     string
	Retries       int
	Timeout       time.Duration // per attempt
	Backoff       time.Duration // longest wait before the first retry; doubles per retry
	MaxBackoff    time.Duration
	MaxRetryAfter time.Duration // longest Retry-After of the gateway honoured
	// OnRequest honours a terminal's request for a change by SMS even when
	// ciphertext is possible (the new values then cross the SMS bearer in
	// plaintext); off by default.
	OnRequest bool
}

// EventsConfig are the presence and security events for applications
// (docs/EVENTS.md): on MQTT under $m2m/events/, and optionally to a
// webhook.
type EventsConfig struct {
	MQTT        bool // publish them under $m2m/events/<sn>/<kind>
	Queue       int  // events waiting to be published; more are dropped and counted
	RefusalRate int  // login_refused and binding_mismatch events per second, all terminals together

	WebhookURL        string // "" = no webhook
	WebhookAuthHeader string
	WebhookAuthValue  string
	WebhookBatch      int           // events per POST
	WebhookRetries    int           // of a failed POST
	WebhookTimeout    time.Duration // per attempt
}

// CampaignsConfig bounds fleet-wide credential changes (m2mctl change
// campaign).
type CampaignsConfig struct {
	MaxRate float64 // highest rate (changes started per second) a campaign may ask for
}

// ClusterConfig is fleet mode: several brokers in front of one Vault that
// share their security state (replay claims, failure counts, the session
// directory, events) on NATS JetStream, through package fleet. It is on
// when NATSURLs names servers or EmbeddedNATS runs a node in the broker.
type ClusterConfig struct {
	// BrokerID names this broker in the fleet; "" = the host name (its
	// characters outside [A-Za-z0-9_-] as '-').
	BrokerID string
	// NATSURLs are the servers of an external NATS cluster (nats:// or
	// tls://); with EmbeddedNATS the broker connects to its own node.
	NATSURLs []string
	// Credentials of the broker's NATS connection; with EmbeddedNATS the
	// node requires the same (user and password, or token).
	NATSUser         string
	NATSPassword     string
	NATSPasswordFile string
	NATSTokenFile    string
	NATSNKeyFile     string // an NKey user seed (SU...)
	NATSCredsFile    string // a NATS .creds file
	// TLS of the broker's NATS connection (required off loopback).
	NATSCA, NATSCert, NATSKey string

	// EmbeddedNATS runs a NATS node with JetStream in the broker; the
	// nodes of the fleet's brokers, routed to each other, are the
	// cluster (no other service).
	EmbeddedNATS bool
	Embedded     EmbeddedNATSConfig

	Replicas     int           // of the fleet's buckets and stream; 0 = 3 (1 for a single node)
	ClaimTimeout time.Duration // a replay claim's retries through a leader election
	Heartbeat    time.Duration // liveness renewal; a broker silent for 3 × it is gone
	// DownlinkQueue bounds the downlinks waiting in the fleet's stream for
	// one terminal (package fleetroute); the oldest are dropped.
	DownlinkQueue int

	// Uplinks routes uplinks between the fleet's brokers (package
	// fleetroute).
	Uplinks UplinksConfig
}

// UplinksConfig is cluster.uplinks: the streams that carry uplinks, wills
// and retained uplinks from broker to broker (fleetroute.UplinkOptions).
type UplinksConfig struct {
	MaxAge           time.Duration // the uplink stream keeps a message this long; a broker's consumer unused this long is removed
	MaxBytes         int           // bound of the uplink stream (the oldest go first)
	RetainedMaxBytes int           // bound of the retained stream
	AckTimeout       time.Duration // a QoS 1/2 uplink waits this long for JetStream, then is refused
	MaxAckPending    int           // messages a broker's consumer has in hand unacknowledged
}

// EmbeddedNATSConfig is the NATS node of cluster.embedded_nats.
type EmbeddedNATSConfig struct {
	Listen        string   // client listener (the broker's own connection)
	ClusterListen string   // route listener, for the other nodes
	Routes        []string // the nodes' route URLs (nats-route://host:port), this one's may be among them
	ClusterName   string
	StoreDir      string // "" = <data_dir>/nats
	// Routes' credentials and mutual TLS (both required off loopback).
	RouteUser         string
	RoutePassword     string
	RoutePasswordFile string
	TLSCert, TLSKey   string
	TLSCA             string
}

// Enabled reports whether fleet mode is on.
func (c ClusterConfig) Enabled() bool { return c.EmbeddedNATS || len(c.NATSURLs) > 0 }

// The tuned mochi per-client resources (see README, "Memory per client").
const (
	DefaultReadBuffer       = 1024
	DefaultWriteBuffer      = 1024
	DefaultMaxWritesPending = 256
)

// Default returns the configuration used when nothing is configured. A
// setting that a library takes is defaulted by that library
// (hook.DefaultOptions, keysvc.DefaultOptions, netguard.DefaultOptions,
// vaultstore.DefaultConfig, the sms.Default constants), so that each
// default is written once; the
// documented defaults of Fields are read from here.
func Default() *Config {
	h, ks, ng := hook.DefaultOptions(), keysvc.DefaultOptions(), netguard.DefaultOptions()
	cp := campaign.DefaultOptions()
	c := &Config{DataDir: "./data"}
	c.Log = LogConfig{Format: "text", Level: "info"}
	c.Store = StoreConfig{Type: "embedded", Vault: vaultstore.DefaultConfig()}
	c.MQTT = MQTTConfig{
		TCP: ":1883", TLS: ":8883", WS: ":8083",
		ReadBuffer: DefaultReadBuffer, WriteBuffer: DefaultWriteBuffer,
		MaxWritesPending: DefaultMaxWritesPending, MaxPacketSize: 1 << 20, SessionExpiry: 7 * 24 * time.Hour,
		Persistence:    "on",
		ConnectTimeout: ng.ConnectTimeout, WriteTimeout: ng.WriteTimeout,
		MaxConnsPerAddr: ng.MaxPerAddr, MaxConns: ng.MaxConns,
	}
	c.Admin.Listen = "127.0.0.1:8080"
	c.Auth = AuthConfig{
		Skew: h.Skew, Grace: h.Grace, SessionLifetime: h.SessionLifetime, StoreTimeout: h.StoreTimeout,
		ThrottleFree: h.Throttle.Free, ThrottleBase: h.Throttle.Base,
		ThrottleMax: h.Throttle.Max, ThrottleMaxEntries: h.Throttle.MaxEntries,
		AppConcurrency: h.Apps.Concurrency, AppConcurrencyPerAddr: h.Apps.ConcurrencyPerAddr,
		AppRate: h.Apps.Rate, AppRatePerAddr: h.Apps.RatePerAddr,
		AppFailuresPerAddr: h.Apps.FailuresPerAddr, AppFailureRefill: h.Apps.FailureRefill,
	}
	c.Keys = KeysConfig{PasswordLifetime: ks.PasswordLifetime, KeyLifetime: ks.KeyLifetime, ChangeDeadline: ks.ChangeDeadline}
	c.Cache = CacheConfig{TTL: ks.Cache.TTL, MaxStale: ks.Cache.MaxStale, MaxEntries: ks.Cache.MaxEntries}
	c.SMS = SMSConfig{
		Retries: 3, // the broker's own choice: the zero sms.HTTPSender does not retry
		Timeout: sms.DefaultTimeout, Backoff: sms.DefaultBackoff, MaxBackoff: sms.DefaultMaxBackoff,
		MaxRetryAfter: sms.DefaultMaxRetryAfter, OnRequest: h.SMSOnRequest,
	}
	c.Events = EventsConfig{
		MQTT: true, Queue: events.DefaultQueueSize, RefusalRate: h.RefusalEventRate,
		WebhookBatch: events.DefaultWebhookBatch, WebhookRetries: events.DefaultWebhookRetries, WebhookTimeout: events.DefaultWebhookTimeout,
	}
	c.Campaigns = CampaignsConfig{MaxRate: cp.MaxRate}
	c.Cluster = ClusterConfig{
		ClaimTimeout: fleet.DefaultClaimTimeout, Heartbeat: fleet.DefaultHeartbeat,
		DownlinkQueue: fleetroute.DefaultDownlinkQueue,
		Embedded:      EmbeddedNATSConfig{Listen: "127.0.0.1:4222", ClusterListen: "127.0.0.1:6222", ClusterName: "m2mguard"},
		Uplinks: UplinksConfig{MaxAge: fleetroute.DefaultUplinkMaxAge, MaxBytes: fleetroute.DefaultUplinkMaxBytes,
			RetainedMaxBytes: fleetroute.DefaultRetainedMaxBytes, AckTimeout: fleetroute.DefaultUplinkAckTimeout,
			MaxAckPending: fleetroute.DefaultUplinkMaxPending},
	}
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
	Key  string // YAML key, dotted: store.vault.address
	Help string
	// Default is the default as documented: the key's value in Default(),
	// or, where the default is worked out at start (a file in data_dir,
	// $VAULT_ADDR), a description of it.
	Default string
	Secret  bool // never printed
	value   access
}

// access reads and writes the setting of a key in a Config.
type access struct {
	set func(c *Config, v string) error // parses and checks v
	get func(c *Config) string          // formatted as set parses it
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

func str(p func(*Config) *string) access {
	return access{
		set: func(c *Config, v string) error { *p(c) = v; return nil },
		get: func(c *Config) string { return *p(c) },
	}
}

func oneOf(p func(*Config) *string, allowed ...string) access {
	return access{
		set: func(c *Config, v string) error {
			v = strings.ToLower(strings.TrimSpace(v))
			for _, a := range allowed {
				if v == a {
					*p(c) = v
					return nil
				}
			}
			return fmt.Errorf("want one of %s", strings.Join(allowed, ", "))
		},
		get: func(c *Config) string { return *p(c) },
	}
}

func dur(p func(*Config) *time.Duration) access {
	return access{
		set: func(c *Config, v string) error {
			d, err := time.ParseDuration(strings.TrimSpace(v))
			if err != nil {
				return errors.New("want a duration such as 30s, 5m or 24h")
			}
			if d < 0 {
				return errors.New("must not be negative")
			}
			*p(c) = d
			return nil
		},
		get: func(c *Config) string { return p(c).String() },
	}
}

func integer(p func(*Config) *int, min, max int) access {
	return access{
		set: func(c *Config, v string) error {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				return errors.New("want an integer")
			}
			if n < min || n > max {
				return fmt.Errorf("want %d to %d", min, max)
			}
			*p(c) = n
			return nil
		},
		get: func(c *Config) string { return strconv.Itoa(*p(c)) },
	}
}

func number(p func(*Config) *float64, min, max float64) access {
	return access{
		set: func(c *Config, v string) error {
			n, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil || math.IsNaN(n) {
				return errors.New("want a number")
			}
			if n < min || n > max {
				return fmt.Errorf("want %g to %g", min, max)
			}
			*p(c) = n
			return nil
		},
		get: func(c *Config) string { return strconv.FormatFloat(*p(c), 'g', -1, 64) },
	}
}

func boolean(p func(*Config) *bool) access {
	return access{
		set: func(c *Config, v string) error {
			b, err := strconv.ParseBool(strings.TrimSpace(v))
			if err != nil {
				return errors.New("want true or false")
			}
			*p(c) = b
			return nil
		},
		get: func(c *Config) string { return strconv.FormatBool(*p(c)) },
	}
}

func addr(p func(*Config) *string) access {
	return access{
		set: func(c *Config, v string) error {
			a, err := listenAddr(v)
			if err != nil {
				return err
			}
			*p(c) = a
			return nil
		},
		get: func(c *Config) string { return *p(c) },
	}
}

// list is a comma-separated list; empty items are dropped.
func list(p func(*Config) *[]string) access {
	return access{
		set: func(c *Config, v string) error {
			var out []string
			for _, item := range strings.Split(v, ",") {
				if item = strings.TrimSpace(item); item != "" {
					out = append(out, item)
				}
			}
			*p(c) = out
			return nil
		},
		get: func(c *Config) string { return strings.Join(*p(c), ",") },
	}
}

func prefixes(p func(*Config) *[]netip.Prefix) access {
	return access{
		set: func(c *Config, v string) error {
			ps, err := netguard.ParsePrefixes(v)
			if err != nil {
				return err
			}
			*p(c) = ps
			return nil
		},
		get: func(c *Config) string {
			s := make([]string, len(*p(c)))
			for i, pf := range *p(c) {
				s[i] = pf.String()
			}
			return strings.Join(s, ",")
		},
	}
}

// listenAddr checks a listen address and returns it as the configuration
// holds it: "" for none ("" or "off").
func listenAddr(v string) (string, error) {
	v = strings.TrimSpace(v)
	if v == "" || v == "off" {
		return "", nil
	}
	if _, port, err := net.SplitHostPort(v); err != nil {
		return "", errors.New(`want host:port, :port or "off"`)
	} else if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return "", errors.New("want a port number 0-65535")
	}
	return v, nil
}

// Fields lists every configuration key, in documentation order.
func Fields() []Field {
	return fields
}

var fields = documentDefaults([]Field{
	{Key: "data_dir", Help: "directory of the embedded store, its master key, the generated admin and metrics tokens, the replay guard's claims (replay/), the session store (sessions.db) and the terminals' last logins (lastseen.db, written every 5 s); created 0700",
		value: str(func(c *Config) *string { return &c.DataDir })},
	{Key: "log.format", Help: "log format: text or json (stderr)",
		value: oneOf(func(c *Config) *string { return &c.Log.Format }, "text", "json")},
	{Key: "log.level", Help: "log level: debug, info, warn or error",
		value: oneOf(func(c *Config) *string { return &c.Log.Level }, "debug", "info", "warn", "error")},

	{Key: "store.type", Help: "where terminal records live: embedded (encrypted file in data_dir) or vault",
		value: oneOf(func(c *Config) *string { return &c.Store.Type }, "embedded", "vault")},
	{Key: "store.embedded.file", Default: "<data_dir>/m2mguard.db", Help: "embedded store file",
		value: str(func(c *Config) *string { return &c.Store.Embedded.File })},
	{Key: "store.embedded.master_key_file", Default: "<data_dir>/master.key", Help: "master key file (32 random bytes, created 0600 on first run); $M2MGUARD_MASTER_KEY (base64) takes precedence; it also seals the session store (mqtt.persistence), whatever the store type",
		value: str(func(c *Config) *string { return &c.Store.Embedded.MasterKeyFile })},
	{Key: "store.embedded.reseal", Help: "reseal code printed when the embedded store fails its integrity check (records rolled back or changed outside m2mguard): accepts the records exactly as they are then; set it once, only after checking them (SECURITY.md)",
		value: str(func(c *Config) *string { return &c.Store.Embedded.Reseal })},
	{Key: "store.vault.address", Default: "$VAULT_ADDR", Help: "Vault address, e.g. https://vault:8200",
		value: str(func(c *Config) *string { return &c.Store.Vault.Address })},
	{Key: "store.vault.mount", Help: "KV v2 mount",
		value: str(func(c *Config) *string { return &c.Store.Vault.Mount })},
	{Key: "store.vault.prefix", Help: "path below the mount",
		value: str(func(c *Config) *string { return &c.Store.Vault.Prefix })},
	{Key: "store.vault.token", Default: "$VAULT_TOKEN", Secret: true, Help: "Vault token (prefer token_file or AppRole)",
		value: str(func(c *Config) *string { return &c.Store.Vault.Token })},
	{Key: "store.vault.token_file", Help: "file holding the Vault token",
		value: str(func(c *Config) *string { return &c.Store.Vault.TokenFile })},
	{Key: "store.vault.ca_cert", Help: "PEM file to verify Vault's TLS certificate (default: system roots)",
		value: str(func(c *Config) *string { return &c.Store.Vault.CACert })},
	{Key: "store.vault.timeout", Help: "per-request timeout",
		value: dur(func(c *Config) *time.Duration { return &c.Store.Vault.Timeout })},
	{Key: "store.vault.max_conns", Help: "connections to Vault, open or idle: requests beyond them wait for one (within the timeout) instead of each opening its own, a file descriptor apiece, in a storm of cache misses",
		value: integer(func(c *Config) *int { return &c.Store.Vault.MaxConns }, 1, 1<<16)},
	{Key: "store.vault.approle.mount", Help: "AppRole auth mount",
		value: str(func(c *Config) *string { return &c.Store.Vault.AppRoleMount })},
	{Key: "store.vault.approle.role_id", Help: "AppRole role_id (AppRole is used when a role_id is set)",
		value: str(func(c *Config) *string { return &c.Store.Vault.AppRoleRoleID })},
	{Key: "store.vault.approle.role_id_file", Help: "file holding the AppRole role_id",
		value: str(func(c *Config) *string { return &c.Store.Vault.AppRoleRoleIDFile })},
	{Key: "store.vault.approle.secret_id", Secret: true, Help: "AppRole secret_id (prefer secret_id_file or the env var)",
		value: str(func(c *Config) *string { return &c.Store.Vault.AppRoleSecretID })},
	{Key: "store.vault.approle.secret_id_file", Help: "file holding the AppRole secret_id",
		value: str(func(c *Config) *string { return &c.Store.Vault.AppRoleSecretIDFile })},
	{Key: "store.vault.approle.wrapping_token", Secret: true, Help: "response-wrapping token of the AppRole secret_id, instead of the secret_id (vault write -wrap-ttl=5m -f auth/approle/role/<role>/secret-id); unwrapped once at start, so every start needs a fresh one",
		value: str(func(c *Config) *string { return &c.Store.Vault.AppRoleWrappingToken })},
	{Key: "store.vault.approle.wrapping_token_file", Help: "file holding that wrapping token (written by the orchestrator before each start)",
		value: str(func(c *Config) *string { return &c.Store.Vault.AppRoleWrappingTokenFile })},
	{Key: "store.vault.kubernetes.role", Help: "Vault role of the Kubernetes auth method (Kubernetes auth is used when it is set)",
		value: str(func(c *Config) *string { return &c.Store.Vault.KubernetesRole })},
	{Key: "store.vault.kubernetes.mount", Help: "Kubernetes auth mount",
		value: str(func(c *Config) *string { return &c.Store.Vault.KubernetesMount })},
	{Key: "store.vault.kubernetes.token_file", Help: "the pod's service account token, read again at every login (the kubelet rotates it)",
		value: str(func(c *Config) *string { return &c.Store.Vault.KubernetesTokenFile })},
	{Key: "store.vault.transit", Help: "issue session keys from Vault Transit (every key an audit-log entry)",
		value: boolean(func(c *Config) *bool { return &c.Store.Vault.Transit })},
	{Key: "store.vault.transit_mount", Help: "Transit mount",
		value: str(func(c *Config) *string { return &c.Store.Vault.TransitMount })},
	{Key: "store.vault.transit_key", Help: "Transit key (type aes256-gcm96)",
		value: str(func(c *Config) *string { return &c.Store.Vault.TransitKey })},

	{Key: "mqtt.tcp", Help: `MQTT over TCP listen address ("off" = none)`,
		value: addr(func(c *Config) *string { return &c.MQTT.TCP })},
	{Key: "mqtt.tls", Help: "MQTT over TLS listen address; active only when tls_cert and tls_key are set",
		value: addr(func(c *Config) *string { return &c.MQTT.TLS })},
	{Key: "mqtt.tls_cert", Help: "PEM certificate (chain) of the TLS and WebSocket listeners",
		value: str(func(c *Config) *string { return &c.MQTT.TLSCert })},
	{Key: "mqtt.tls_key", Help: "PEM private key of the TLS and WebSocket listeners",
		value: str(func(c *Config) *string { return &c.MQTT.TLSKey })},
	{Key: "mqtt.ws", Help: `MQTT over WebSocket listen address, any path (ws://host:8083/mqtt; wss:// when tls_cert is set; "off" = none)`,
		value: addr(func(c *Config) *string { return &c.MQTT.WS })},
	{Key: "mqtt.read_buffer", Help: "read buffer per client, bytes (mochi default 2048)",
		value: integer(func(c *Config) *int { return &c.MQTT.ReadBuffer }, 256, 1<<20)},
	{Key: "mqtt.write_buffer", Help: "write buffer per client, bytes (mochi default 2048)",
		value: integer(func(c *Config) *int { return &c.MQTT.WriteBuffer }, 256, 1<<20)},
	{Key: "mqtt.max_writes_pending", Help: "outbound queue per client, messages; allocated up front, 8 bytes each (mochi default 8192)",
		value: integer(func(c *Config) *int { return &c.MQTT.MaxWritesPending }, 16, 1<<16)},
	{Key: "mqtt.session_expiry", Help: "how long the session (subscriptions, queued QoS 1 messages) of a disconnected client is kept (mochi's default is forever); queued messages live as long, retained messages at least 24 h",
		value: dur(func(c *Config) *time.Duration { return &c.MQTT.SessionExpiry })},
	{Key: "mqtt.persistence", Help: "keep persistent sessions (subscriptions, queued and unacknowledged QoS 1/2 messages) and retained messages across restarts, sealed under the master key in persistence_file: on (fsync every second: kill -9 loses nothing acknowledged, a power loss at most the last second), sync (fsync every commit: a power loss loses nothing acknowledged; slower) or off",
		value: oneOf(func(c *Config) *string { return &c.MQTT.Persistence }, "on", "sync", "off")},
	{Key: "mqtt.persistence_file", Default: "<data_dir>/sessions.db", Help: "session store file (created 0600)",
		value: str(func(c *Config) *string { return &c.MQTT.PersistenceFile })},
	{Key: "mqtt.max_packet_size", Help: "largest MQTT packet accepted, bytes (0 = no limit)",
		value: integer(func(c *Config) *int { return &c.MQTT.MaxPacketSize }, 0, 256<<20)},
	{Key: "mqtt.connect_timeout", Help: "a new connection (TCP, TLS or WebSocket) must send its CONNECT within this (slow-loris guard); a WebSocket gets it once for the HTTP upgrade and once for the CONNECT",
		value: dur(func(c *Config) *time.Duration { return &c.MQTT.ConnectTimeout })},
	{Key: "mqtt.write_timeout", Help: "every write to a client must finish within this, else its connection is closed (a client that stops reading)",
		value: dur(func(c *Config) *time.Duration { return &c.MQTT.WriteTimeout })},
	{Key: "mqtt.max_conns_per_addr", Help: "open connections from one IP address, all MQTT listeners together; more are closed at once",
		value: integer(func(c *Config) *int { return &c.MQTT.MaxConnsPerAddr }, 1, 1<<24)},
	{Key: "mqtt.max_conns", Help: "open connections in all, all MQTT listeners together (0 = no limit)",
		value: integer(func(c *Config) *int { return &c.MQTT.MaxConns }, 0, 1<<30)},
	{Key: "mqtt.proxy_protocol_trusted", Help: "load balancers that send a PROXY protocol header (v2 or v1) before each connection: networks or addresses, comma-separated (10.0.0.0/8,192.0.2.7); a connection from them must start with one and is then counted, throttled and logged by the client address it names; a header from any other address is refused; empty = off (README, Load balancing)",
		value: prefixes(func(c *Config) *[]netip.Prefix { return &c.MQTT.ProxyProtocolTrusted })},
	{Key: "mqtt.public_url", Default: "tcp://<hostname>:<tcp port>", Help: "broker URL written into provisioning bundles (m2mctl terminal add)",
		value: str(func(c *Config) *string { return &c.MQTT.PublicURL })},

	{Key: "admin.listen", Help: `admin HTTP API listen address ("off" = none); keep it on loopback or a private network`,
		value: addr(func(c *Config) *string { return &c.Admin.Listen })},
	{Key: "admin.token", Secret: true, Help: "admin bearer token (at least 16 characters); default: read from token_file, generated there on first run",
		value: str(func(c *Config) *string { return &c.Admin.Token })},
	{Key: "admin.token_file", Default: "<data_dir>/admin.token", Help: "file of the admin bearer token (created 0600 on first run)",
		value: str(func(c *Config) *string { return &c.Admin.TokenFile })},
	{Key: "admin.tokens_file", Help: "file of named operators, one a line: <name> <role: full or read> sha256:<SHA-256 of its token, hex> (m2mctl token new prints one); a read-only operator may only GET; the admin token stays the full operator \"admin\"; audit lines and events name the operator; read at start; empty = none",
		value: str(func(c *Config) *string { return &c.Admin.TokensFile })},
	{Key: "admin.metrics_token", Secret: true, Help: "bearer token that may read /metrics and nothing else (at least 16 characters; the admin token is accepted too); default: read from metrics_token_file, generated there on first run",
		value: str(func(c *Config) *string { return &c.Admin.MetricsToken })},
	{Key: "admin.metrics_token_file", Default: "<data_dir>/metrics.token", Help: "file of the metrics bearer token (created 0600 on first run); give it to Prometheus as credentials_file",
		value: str(func(c *Config) *string { return &c.Admin.MetricsTokenFile })},

	{Key: "auth.skew", Help: "allowed |now - ts| at login",
		value: dur(func(c *Config) *time.Duration { return &c.Auth.Skew })},
	{Key: "auth.grace", Help: "logins still allowed this long after up expired (a change starts at once)",
		value: dur(func(c *Config) *time.Duration { return &c.Auth.Grace })},
	{Key: "auth.session_lifetime", Help: "life of a session key; the session ends then",
		value: dur(func(c *Config) *time.Duration { return &c.Auth.SessionLifetime })},
	{Key: "auth.store_timeout", Help: "timeout of one key-service call during a login",
		value: dur(func(c *Config) *time.Duration { return &c.Auth.StoreTimeout })},
	{Key: "auth.throttle_free", Help: "failed logins of one sn from one address answered before refusals start",
		value: integer(func(c *Config) *int { return &c.Auth.ThrottleFree }, 1, 1000)},
	{Key: "auth.throttle_base", Help: "first refusal period; doubles with every further failure",
		value: dur(func(c *Config) *time.Duration { return &c.Auth.ThrottleBase })},
	{Key: "auth.throttle_max", Help: "longest refusal period",
		value: dur(func(c *Config) *time.Duration { return &c.Auth.ThrottleMax })},
	{Key: "auth.throttle_max_entries", Help: "(sn or application name, address) pairs the throttle remembers, least recently seen forgotten first (m2mguard_throttle_max_entries)",
		value: integer(func(c *Config) *int { return &c.Auth.ThrottleMaxEntries }, 1000, 100_000_000)},
	{Key: "auth.app_concurrency", Help: "application password verifications (argon2id, 19 MiB each) running at once; more logins are refused at once with 0x89 server busy (0 = half the CPUs, at least 1)",
		value: integer(func(c *Config) *int { return &c.Auth.AppConcurrency }, 0, 1<<16)},
	{Key: "auth.app_concurrency_per_addr", Help: "application password verifications running at once for one address (an IPv4 address or an IPv6 /64)",
		value: integer(func(c *Config) *int { return &c.Auth.AppConcurrencyPerAddr }, 1, 1<<16)},
	{Key: "auth.app_rate", Help: "application password verifications started per second, all addresses (bursts of two seconds' worth); 0 = 10 × app_concurrency",
		value: number(func(c *Config) *float64 { return &c.Auth.AppRate }, 0, 1e6)},
	{Key: "auth.app_rate_per_addr", Help: "application password verifications started per second for one address",
		value: number(func(c *Config) *float64 { return &c.Auth.AppRatePerAddr }, 0.001, 1e6)},
	{Key: "auth.app_failures_per_addr", Help: "failed application logins from one address, whatever the names, before that address is refused (0x8A)",
		value: integer(func(c *Config) *int { return &c.Auth.AppFailuresPerAddr }, 1, 1<<20)},
	{Key: "auth.app_failure_refill", Help: "after app_failures_per_addr, one more failed application login is allowed per address every this long",
		value: dur(func(c *Config) *time.Duration { return &c.Auth.AppFailureRefill })},

	{Key: "keys.password_lifetime", Help: "life of generated access passwords (0 = never expire)",
		value: dur(func(c *Config) *time.Duration { return &c.Keys.PasswordLifetime })},
	{Key: "keys.key_lifetime", Help: "life of generated basic keys (0 = never expire)",
		value: dur(func(c *Config) *time.Duration { return &c.Keys.KeyLifetime })},
	{Key: "keys.change_deadline", Help: "how long a credential change waits for its commit",
		value: dur(func(c *Config) *time.Duration { return &c.Keys.ChangeDeadline })},

	{Key: "cache.ttl", Help: "terminal records are served from cache this long",
		value: dur(func(c *Config) *time.Duration { return &c.Cache.TTL })},
	{Key: "cache.max_stale", Help: "known terminals still log in this long while the store is unavailable",
		value: dur(func(c *Config) *time.Duration { return &c.Cache.MaxStale })},
	{Key: "cache.max_entries", Help: "cached terminal records",
		value: integer(func(c *Config) *int { return &c.Cache.MaxEntries }, 1, 100_000_000)},

	{Key: "sms.url", Help: `SMS gateway send endpoint (POST {"to","text"}); empty = no SMS channel`,
		value: str(func(c *Config) *string { return &c.SMS.URL })},
	{Key: "sms.auth_header", Help: "request header for the gateway, e.g. Authorization",
		value: str(func(c *Config) *string { return &c.SMS.AuthHeader })},
	{Key: "sms.auth_value", Secret: true, Help: "value of that header",
		value: str(func(c *Config) *string { return &c.SMS.AuthValue })},
	{Key: "sms.retries", Help: "retries of a failed gateway request (transport errors, 429 and 5xx; other answers fail at once)",
		value: integer(func(c *Config) *int { return &c.SMS.Retries }, 0, 100)},
	{Key: "sms.timeout", Help: "timeout of one gateway request",
		value: dur(func(c *Config) *time.Duration { return &c.SMS.Timeout })},
	{Key: "sms.backoff", Help: "longest wait before the first retry, doubled for each next one; each wait is random in its upper half",
		value: dur(func(c *Config) *time.Duration { return &c.SMS.Backoff })},
	{Key: "sms.max_backoff", Help: "longest wait between retries (without Retry-After)",
		value: dur(func(c *Config) *time.Duration { return &c.SMS.MaxBackoff })},
	{Key: "sms.max_retry_after", Help: "longest Retry-After of a 429 or 503 honoured; a gateway asking for more ends the send, and the change is sent again later",
		value: dur(func(c *Config) *time.Duration { return &c.SMS.MaxRetryAfter })},
	{Key: "sms.on_request", Help: "send a change by SMS when the terminal asks for it although ciphertext is possible (the new values then cross the SMS bearer in plaintext); off: SMS only when the basic key is not in sync",
		value: boolean(func(c *Config) *bool { return &c.SMS.OnRequest })},

	{Key: "events.mqtt", Help: "publish presence and security events on $m2m/events/<sn>/<kind> (docs/EVENTS.md); only applications whose subscribe reach includes a $m2m/events/ filter receive them",
		value: boolean(func(c *Config) *bool { return &c.Events.MQTT })},
	{Key: "events.queue", Help: "events waiting to be published; when it is full further events are dropped and counted (m2mguard_events_dropped_total)",
		value: integer(func(c *Config) *int { return &c.Events.Queue }, 16, 1<<24)},
	{Key: "events.refusal_rate", Help: "login_refused and binding_mismatch events per second, all terminals together (only known terminals give them); the rest are counted, not published",
		value: integer(func(c *Config) *int { return &c.Events.RefusalRate }, 1, 1<<20)},
	{Key: "events.webhook_url", Help: "also POST the events, in JSON batches, to this URL (http:// or https://); empty = no webhook",
		value: str(func(c *Config) *string { return &c.Events.WebhookURL })},
	{Key: "events.webhook_auth_header", Help: "request header for the webhook, e.g. Authorization",
		value: str(func(c *Config) *string { return &c.Events.WebhookAuthHeader })},
	{Key: "events.webhook_auth_value", Secret: true, Help: "value of that header",
		value: str(func(c *Config) *string { return &c.Events.WebhookAuthValue })},
	{Key: "events.webhook_batch", Help: "most events per webhook POST (a batch goes out when full or a second after its first event)",
		value: integer(func(c *Config) *int { return &c.Events.WebhookBatch }, 1, 10000)},
	{Key: "events.webhook_retries", Help: "retries of a failed webhook POST (transport errors, 429 and 5xx), with exponential back-off or the receiver's Retry-After; then the batch is dropped and counted",
		value: integer(func(c *Config) *int { return &c.Events.WebhookRetries }, 0, 100)},
	{Key: "events.webhook_timeout", Help: "timeout of one webhook POST",
		value: dur(func(c *Config) *time.Duration { return &c.Events.WebhookTimeout })},

	{Key: "campaigns.max_rate", Help: "highest rate, in changes started per second, a credential-change campaign may ask for (m2mctl change campaign start --rate)",
		value: number(func(c *Config) *float64 { return &c.Campaigns.MaxRate }, 0.001, 1e6)},
	{Key: "cluster.broker_id", Default: "the host name", Help: "fleet mode: this broker's id in the fleet, unique, 1-64 of [A-Za-z0-9_-]",
		value: str(func(c *Config) *string { return &c.Cluster.BrokerID })},
	{Key: "cluster.nats_urls", Help: "fleet mode with an external NATS cluster (JetStream): its servers, comma-separated (nats://host:4222, tls://host:4222); off loopback TLS and credentials are required",
		value: list(func(c *Config) *[]string { return &c.Cluster.NATSURLs })},
	{Key: "cluster.nats_user", Help: "NATS user of the broker's connection (with cluster.embedded_nats its node requires it)",
		value: str(func(c *Config) *string { return &c.Cluster.NATSUser })},
	{Key: "cluster.nats_password", Secret: true, Help: "its password (prefer nats_password_file)",
		value: str(func(c *Config) *string { return &c.Cluster.NATSPassword })},
	{Key: "cluster.nats_password_file", Help: "file holding that password",
		value: str(func(c *Config) *string { return &c.Cluster.NATSPasswordFile })},
	{Key: "cluster.nats_token_file", Help: "file holding a NATS token, instead of a user (with cluster.embedded_nats its node requires it)",
		value: str(func(c *Config) *string { return &c.Cluster.NATSTokenFile })},
	{Key: "cluster.nats_nkey_file", Help: "file holding an NKey user seed (SU...), instead of a user (external NATS)",
		value: str(func(c *Config) *string { return &c.Cluster.NATSNKeyFile })},
	{Key: "cluster.nats_creds_file", Help: "NATS .creds file (user JWT and seed), instead of a user (external NATS)",
		value: str(func(c *Config) *string { return &c.Cluster.NATSCredsFile })},
	{Key: "cluster.nats_ca", Help: "PEM file to verify the NATS servers' TLS certificates",
		value: str(func(c *Config) *string { return &c.Cluster.NATSCA })},
	{Key: "cluster.nats_cert", Help: "client certificate (PEM) of the broker's NATS connection, for servers that verify clients",
		value: str(func(c *Config) *string { return &c.Cluster.NATSCert })},
	{Key: "cluster.nats_key", Help: "its key (PEM)",
		value: str(func(c *Config) *string { return &c.Cluster.NATSKey })},
	{Key: "cluster.embedded_nats", Help: "fleet mode without another service: run a NATS node with JetStream in this broker; the nodes of the fleet's brokers, routed to each other (cluster.embedded.routes), are the cluster",
		value: boolean(func(c *Config) *bool { return &c.Cluster.EmbeddedNATS })},
	{Key: "cluster.embedded.listen", Help: "the embedded node's client listener, for this broker's own connection (keep it on loopback)",
		value: addr(func(c *Config) *string { return &c.Cluster.Embedded.Listen })},
	{Key: "cluster.embedded.cluster_listen", Help: "the embedded node's route listener, which the other nodes dial; off loopback it needs route credentials and mutual TLS",
		value: addr(func(c *Config) *string { return &c.Cluster.Embedded.ClusterListen })},
	{Key: "cluster.embedded.routes", Help: "route URLs of the fleet's nodes, comma-separated (nats-route://host:6222; this node's own may be among them, so every broker can have the same list)",
		value: list(func(c *Config) *[]string { return &c.Cluster.Embedded.Routes })},
	{Key: "cluster.embedded.cluster_name", Help: "NATS cluster name, the same on every node",
		value: str(func(c *Config) *string { return &c.Cluster.Embedded.ClusterName })},
	{Key: "cluster.embedded.store_dir", Default: "<data_dir>/nats", Help: "the embedded node's JetStream files",
		value: str(func(c *Config) *string { return &c.Cluster.Embedded.StoreDir })},
	{Key: "cluster.embedded.route_user", Help: "user the nodes' routes authenticate with, both ways",
		value: str(func(c *Config) *string { return &c.Cluster.Embedded.RouteUser })},
	{Key: "cluster.embedded.route_password", Secret: true, Help: "its password (prefer route_password_file)",
		value: str(func(c *Config) *string { return &c.Cluster.Embedded.RoutePassword })},
	{Key: "cluster.embedded.route_password_file", Help: "file holding that password",
		value: str(func(c *Config) *string { return &c.Cluster.Embedded.RoutePasswordFile })},
	{Key: "cluster.embedded.tls_cert", Help: "certificate (PEM) of the routes' mutual TLS",
		value: str(func(c *Config) *string { return &c.Cluster.Embedded.TLSCert })},
	{Key: "cluster.embedded.tls_key", Help: "its key (PEM)",
		value: str(func(c *Config) *string { return &c.Cluster.Embedded.TLSKey })},
	{Key: "cluster.embedded.tls_ca", Help: "CA (PEM) that signs the nodes' route certificates",
		value: str(func(c *Config) *string { return &c.Cluster.Embedded.TLSCA })},
	{Key: "cluster.replicas", Help: "replicas of the fleet's buckets and stream: 0 = 3 (1 on a single node); a claim survives the loss of a minority of them",
		value: integer(func(c *Config) *int { return &c.Cluster.Replicas }, 0, 5)},
	{Key: "cluster.claim_timeout", Help: "how long a replay claim retries while JetStream elects a leader; then the login is refused (MQTT 5 0x88) and the terminal tries again",
		value: dur(func(c *Config) *time.Duration { return &c.Cluster.ClaimTimeout })},
	{Key: "cluster.heartbeat", Help: "how often a broker renews its liveness in the fleet; one silent for 3 heartbeats is gone (its sessions are removed from the directory), the same on every broker",
		value: dur(func(c *Config) *time.Duration { return &c.Cluster.Heartbeat })},
	{Key: "cluster.downlink_queue", Help: "fleet mode: downlinks waiting in JetStream for one terminal (offline, or on its way to another broker), at most; an application's downlink to a full queue drops the oldest (m2mguard_fleet_route_downlinks_dropped_total); each waits at most mqtt.session_expiry",
		value: integer(func(c *Config) *int { return &c.Cluster.DownlinkQueue }, 1, 1000000)},
	{Key: "cluster.uplinks.max_age", Help: "fleet mode routes uplinks, wills and retained uplinks to the applications on every broker through a JetStream stream: how long it keeps a message for a broker that is down (and how long a gone broker's consumer is kept)",
		value: dur(func(c *Config) *time.Duration { return &c.Cluster.Uplinks.MaxAge })},
	{Key: "cluster.uplinks.max_bytes", Help: "bound of that stream in bytes, reserved on each replica's NATS node (the oldest messages go first; an embedded node stores at most 1 GiB in all)",
		value: integer(func(c *Config) *int { return &c.Cluster.Uplinks.MaxBytes }, 1<<20, 1<<40)},
	{Key: "cluster.uplinks.retained_max_bytes", Help: "bound of the stream of retained uplinks (the last retained uplink of every topic, loaded by a broker at start) in bytes",
		value: integer(func(c *Config) *int { return &c.Cluster.Uplinks.RetainedMaxBytes }, 1<<20, 1<<40)},
	{Key: "cluster.uplinks.ack_timeout", Help: "how long a QoS 1 or 2 uplink waits for JetStream to store it before the broker acknowledges it; then the publish is refused (the client is disconnected unacknowledged and sends it again)",
		value: dur(func(c *Config) *time.Duration { return &c.Cluster.Uplinks.AckTimeout })},
	{Key: "cluster.uplinks.max_ack_pending", Help: "uplinks of other brokers a broker has in hand, injected or about to be, and not yet acknowledged to JetStream",
		value: integer(func(c *Config) *int { return &c.Cluster.Uplinks.MaxAckPending }, 1, 1<<20)},
})

// documentDefaults sets the documented Default of every field that has
// none written to its value in Default(), so that a default is written
// once (in Default, which takes it from the library that uses it). A
// written Default describes what start works out for a key that is empty
// in Default() (a file in data_dir, $VAULT_ADDR); a test keeps it so.
func documentDefaults(fs []Field) []Field {
	d := Default()
	for i := range fs {
		if fs[i].Default == "" && !fs[i].Secret {
			fs[i].Default = fs[i].value.get(d)
		}
	}
	return fs
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
			if err := f.value.set(c, val); err != nil {
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
			if err := f.value.set(c, v); err != nil {
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
		if e := f.value.set(c, fl.Value.String()); e != nil {
			err = &ConfigError{Key: f.Key, Source: "flag --" + f.Flag(), Err: e}
		}
	}
	return err
}

// Resolve builds the configuration from its layers, each overriding the one
// before: defaults, the YAML file (--config, else $M2MGUARD_CONFIG; none if
// neither), environment variables, flags. Then it derives the settings
// left to follow others (Derive) and validates the result.
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
	c.Derive()
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

// Derive fills in the settings that follow from others when they are
// left empty: the files in data_dir (store.embedded.file,
// store.embedded.master_key_file, admin.token_file,
// admin.metrics_token_file, mqtt.persistence_file), mqtt.persistence (on)
// and, in fleet mode, cluster.embedded.store_dir and cluster.broker_id (the
// host name). Resolve and Start call it before Validate.
func (c *Config) Derive() {
	inDataDir := func(file *string, name string) {
		if *file == "" {
			*file = filepath.Join(c.DataDir, name)
		}
	}
	inDataDir(&c.Store.Embedded.File, "m2mguard.db")
	inDataDir(&c.Store.Embedded.MasterKeyFile, "master.key")
	inDataDir(&c.Admin.TokenFile, "admin.token")
	inDataDir(&c.MQTT.PersistenceFile, "sessions.db")
	if c.MQTT.Persistence == "" {
		c.MQTT.Persistence = "on"
	}
	inDataDir(&c.Admin.MetricsTokenFile, "metrics.token")
	if c.Cluster.Enabled() {
		inDataDir(&c.Cluster.Embedded.StoreDir, "nats")
		if c.Cluster.BrokerID == "" {
			c.Cluster.BrokerID = hostBrokerID()
		}
	}
}

// hostBrokerID is the host name as a broker id: its characters outside
// [A-Za-z0-9_-] as '-', at most 64.
func hostBrokerID() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		return ""
	}
	id := []byte(host)
	for i, ch := range id {
		if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '_' || ch == '-') {
			id[i] = '-'
		}
	}
	return string(id[:min(len(id), 64)])
}

// Validate checks the keys and their combinations, section by section,
// and changes nothing. Errors are *ConfigError naming the key.
func (c Config) Validate() error {
	if c.DataDir == "" {
		return bad("data_dir", "must not be empty")
	}
	for _, section := range []func() error{
		c.Log.validate, c.Store.validate, c.MQTT.validate, c.Admin.validate,
		c.Auth.validate, c.Keys.validate, c.Cache.validate, c.SMS.validate, c.Events.validate,
		c.Auth.validate, c.Keys.validate, c.Cache.validate, c.SMS.validate, c.validateCluster,
	} {
		if err := section(); err != nil {
			return err
		}
	}
	return nil
}

// bad is a *ConfigError of key.
func bad(key, format string, a ...any) error {
	return &ConfigError{Key: key, Err: fmt.Errorf(format, a...)}
}

// positive checks that each duration, named by its key, is above zero.
func positive(durations ...keyed) error {
	for _, d := range durations {
		if d.v <= 0 {
			return bad(d.key, "must be positive")
		}
	}
	return nil
}

// keyed is a duration and its key.
type keyed struct {
	key string
	v   time.Duration
}

func (c LogConfig) validate() error {
	switch c.Format {
	case "text", "json":
	default:
		return bad("log.format", "want text or json")
	}
	if _, err := parseLevel(c.Level); err != nil {
		return bad("log.level", "want debug, info, warn or error")
	}
	return nil
}

// validate checks the store type and, for Vault, the rules of package
// vaultstore, under the store.vault keys.
func (c StoreConfig) validate() error {
	switch c.Type {
	case "embedded":
		return nil
	case "vault":
		var ve *vaultstore.ConfigError
		if err := c.Vault.Validate(); errors.As(err, &ve) {
			return &ConfigError{Key: "store.vault." + ve.Key, Err: ve.Err}
		} else if err != nil {
			return &ConfigError{Key: "store.vault", Err: err}
		}
		return nil
	default:
		return bad("store.type", "want embedded or vault")
	}
}

func (c MQTTConfig) validate() error {
	if (c.TLSCert == "") != (c.TLSKey == "") {
		if c.TLSCert == "" {
			return bad("mqtt.tls_cert", "set together with mqtt.tls_key")
		}
		return bad("mqtt.tls_key", "set together with mqtt.tls_cert")
	}
	if c.TCP == "" && c.WS == "" && (c.TLS == "" || c.TLSCert == "") {
		return bad("mqtt.tcp", "no MQTT listener is enabled (mqtt.tcp, mqtt.tls with a certificate, or mqtt.ws)")
	}
	for _, l := range [][2]string{{"mqtt.tcp", c.TCP}, {"mqtt.tls", c.TLS}, {"mqtt.ws", c.WS}} {
		if _, err := listenAddr(l[1]); err != nil {
			return bad(l[0], "%v", err)
		}
	}
	if c.ReadBuffer < 256 {
		return bad("mqtt.read_buffer", "at least 256")
	}
	if c.WriteBuffer < 256 {
		return bad("mqtt.write_buffer", "at least 256")
	}
	if c.MaxWritesPending < 16 {
		return bad("mqtt.max_writes_pending", "at least 16")
	}
	switch c.Persistence {
	case "on", "sync", "off":
	default:
		return bad("mqtt.persistence", "want on, sync or off")
	}
	return positive(keyed{"mqtt.connect_timeout", c.ConnectTimeout}, keyed{"mqtt.write_timeout", c.WriteTimeout},
		keyed{"mqtt.session_expiry", c.SessionExpiry})
}

func (c AdminConfig) validate() error {
	if _, err := listenAddr(c.Listen); err != nil {
		return bad("admin.listen", "%v", err)
	}
	if c.Token != "" && len(c.Token) < 16 {
		return bad("admin.token", "at least 16 characters")
	}
	if c.MetricsToken != "" && len(c.MetricsToken) < 16 {
		return bad("admin.metrics_token", "at least 16 characters")
	}
	return nil
}

func (c AuthConfig) validate() error {
	if err := positive(keyed{"auth.skew", c.Skew}, keyed{"auth.session_lifetime", c.SessionLifetime},
		keyed{"auth.store_timeout", c.StoreTimeout}, keyed{"auth.throttle_base", c.ThrottleBase},
		keyed{"auth.throttle_max", c.ThrottleMax}, keyed{"auth.app_failure_refill", c.AppFailureRefill}); err != nil {
		return err
	}
	if c.ThrottleMax < c.ThrottleBase {
		return bad("auth.throttle_max", "must be at least auth.throttle_base")
	}
	return nil
}

func (c KeysConfig) validate() error {
	return positive(keyed{"keys.change_deadline", c.ChangeDeadline})
}

func (c CacheConfig) validate() error {
	return positive(keyed{"cache.ttl", c.TTL})
}

func (c SMSConfig) validate() error {
	if c.URL != "" && !strings.HasPrefix(c.URL, "http://") && !strings.HasPrefix(c.URL, "https://") {
		return bad("sms.url", "want an http:// or https:// URL")
	}
	if (c.AuthHeader == "") != (c.AuthValue == "") {
		return bad("sms.auth_value", "set sms.auth_header and sms.auth_value together")
	}
	if err := positive(keyed{"sms.timeout", c.Timeout}, keyed{"sms.backoff", c.Backoff},
		keyed{"sms.max_backoff", c.MaxBackoff}, keyed{"sms.max_retry_after", c.MaxRetryAfter}); err != nil {
		return err
	}
	if c.MaxBackoff < c.Backoff {
		return bad("sms.max_backoff", "must be at least sms.backoff")
	}
	return nil
}

func (c EventsConfig) validate() error {
	if c.WebhookURL != "" && !strings.HasPrefix(c.WebhookURL, "http://") && !strings.HasPrefix(c.WebhookURL, "https://") {
		return bad("events.webhook_url", "want an http:// or https:// URL")
	}
	if (c.WebhookAuthHeader == "") != (c.WebhookAuthValue == "") {
		return bad("events.webhook_auth_value", "set events.webhook_auth_header and events.webhook_auth_value together")
	}
	return positive(keyed{"events.webhook_timeout", c.WebhookTimeout})
}

// validateCluster checks fleet mode: Vault as the store (the brokers share
// it), a broker id, and credentials and TLS that go together.
func (c Config) validateCluster() error {
	cl := c.Cluster
	if err := positive(keyed{"cluster.claim_timeout", cl.ClaimTimeout}, keyed{"cluster.heartbeat", cl.Heartbeat},
		keyed{"cluster.uplinks.max_age", cl.Uplinks.MaxAge}, keyed{"cluster.uplinks.ack_timeout", cl.Uplinks.AckTimeout}); err != nil {
		return err
	}
	if !cl.Enabled() {
		if len(cl.Embedded.Routes) > 0 {
			return bad("cluster.embedded.routes", "set cluster.embedded_nats too (routes are the embedded node's)")
		}
		return nil
	}
	if c.Store.Type != "vault" {
		return bad("store.type", "fleet mode (cluster.nats_urls or cluster.embedded_nats) needs store.type vault: the brokers of a fleet share one Vault, an embedded store is one broker's")
	}
	if cl.BrokerID == "" {
		return bad("cluster.broker_id", "no host name to default to: set one")
	}
	if !brokerIDRE.MatchString(cl.BrokerID) {
		return bad("cluster.broker_id", "want 1 to 64 of [A-Za-z0-9_-]")
	}
	kinds := 0
	for _, set := range []bool{cl.NATSUser != "" || cl.NATSPassword != "" || cl.NATSPasswordFile != "", cl.NATSTokenFile != "",
		cl.NATSNKeyFile != "", cl.NATSCredsFile != ""} {
		if set {
			kinds++
		}
	}
	if kinds > 1 {
		return bad("cluster.nats_user", "one kind of NATS credentials: a user and password, a token file, an nkey file or a creds file")
	}
	if (cl.NATSPassword != "" || cl.NATSPasswordFile != "") && cl.NATSUser == "" {
		return bad("cluster.nats_user", "set together with cluster.nats_password or cluster.nats_password_file")
	}
	if (cl.NATSCert == "") != (cl.NATSKey == "") {
		return bad("cluster.nats_cert", "set together with cluster.nats_key")
	}
	if cl.EmbeddedNATS {
		if cl.NATSNKeyFile != "" || cl.NATSCredsFile != "" {
			return bad("cluster.nats_nkey_file", "the embedded node knows users and passwords, or a token: not nkeys or creds files")
		}
		e := cl.Embedded
		if e.Listen == "" {
			return bad("cluster.embedded.listen", "the broker connects to its node there: must not be off")
		}
		if len(e.Routes) > 0 && e.ClusterListen == "" {
			return bad("cluster.embedded.cluster_listen", "routes need a route listener")
		}
		if (e.TLSCert == "") != (e.TLSKey == "") {
			return bad("cluster.embedded.tls_cert", "set together with cluster.embedded.tls_key")
		}
		if (e.RoutePassword != "" || e.RoutePasswordFile != "") && e.RouteUser == "" {
			return bad("cluster.embedded.route_user", "set together with cluster.embedded.route_password")
		}
	}
	return nil
}

var brokerIDRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

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

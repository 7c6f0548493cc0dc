package broker_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/fleetlink"
	"github.com/m2mguard/m2mguard/fleetroute"
	"github.com/m2mguard/m2mguard/internal/haproxytest"
	"github.com/m2mguard/m2mguard/internal/natstest"
)

// resolve runs the layers with a YAML file (if yaml != ""), env and args.
func resolve(t *testing.T, yaml string, env map[string]string, args ...string) (*broker.Config, error) {
	t.Helper()
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	broker.AddFlags(fs)
	if yaml != "" {
		path := filepath.Join(t.TempDir(), "m2mguard.yaml")
		if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		args = append([]string{"--config", path}, args...)
	}
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return broker.Resolve(fs, func(k string) (string, bool) { v, ok := env[k]; return v, ok })
}

func TestConfigPrecedence(t *testing.T) {
	yaml := `
data_dir: /var/lib/m2mguard
log:
  format: json
mqtt:
  tcp: ":2883"
  ws: "off"
auth.skew: 2m
`
	for _, tc := range []struct {
		name  string
		yaml  string
		env   map[string]string
		args  []string
		check func(*broker.Config) string
	}{
		{"defaults", "", nil, nil, func(c *broker.Config) string {
			if c.Store.Type != "embedded" || c.DataDir != "./data" || c.MQTT.TCP != ":1883" || c.MQTT.WS != ":8083" ||
				c.Admin.Listen != "127.0.0.1:8080" || c.Store.Embedded.File != filepath.Join("data", "m2mguard.db") ||
				c.Admin.TokenFile != filepath.Join("data", "admin.token") || c.MQTT.MaxWritesPending != broker.DefaultMaxWritesPending {
				return "unexpected defaults"
			}
			return ""
		}},
		{"yaml over defaults", yaml, nil, nil, func(c *broker.Config) string {
			if c.DataDir != "/var/lib/m2mguard" || c.Log.Format != "json" || c.MQTT.TCP != ":2883" || c.MQTT.WS != "" || c.Auth.Skew != 2*time.Minute {
				return "yaml not applied"
			}
			if c.Store.Embedded.MasterKeyFile != "/var/lib/m2mguard/master.key" {
				return "paths do not follow data_dir: " + c.Store.Embedded.MasterKeyFile
			}
			return ""
		}},
		{"env over yaml", yaml, map[string]string{"M2MGUARD_MQTT_TCP": "127.0.0.1:3883", "M2MGUARD_LOG_FORMAT": "text"}, nil, func(c *broker.Config) string {
			if c.MQTT.TCP != "127.0.0.1:3883" || c.Log.Format != "text" || c.DataDir != "/var/lib/m2mguard" {
				return "env did not override yaml"
			}
			return ""
		}},
		{"flag over env", yaml, map[string]string{"M2MGUARD_MQTT_TCP": "127.0.0.1:3883"}, []string{"--mqtt-tcp", "127.0.0.1:4883", "--auth-skew=90s"}, func(c *broker.Config) string {
			if c.MQTT.TCP != "127.0.0.1:4883" || c.Auth.Skew != 90*time.Second {
				return "flag did not override env"
			}
			return ""
		}},
		{"missing config file named by env", "", nil, nil, nil},
		{"empty env is unset", "", map[string]string{"M2MGUARD_MQTT_TCP": ""}, nil, func(c *broker.Config) string {
			if c.MQTT.TCP != ":1883" {
				return "empty env var applied"
			}
			return ""
		}},
		{"vault with approle from files", `
store:
  type: vault
  vault:
    address: https://vault:8200
    approle:
      role_id_file: /run/role_id
      secret_id_file: /run/secret_id
`, map[string]string{"VAULT_TOKEN": "ignored-with-approle"}, nil, func(c *broker.Config) string {
			if c.Store.Type != "vault" || c.Store.Vault.AppRoleRoleIDFile != "/run/role_id" || c.Store.Vault.Mount != "secret" {
				return "vault config not applied"
			}
			return ""
		}},
		{"application login budgets", "auth: {app_concurrency: 2, app_rate: 2.5, app_rate_per_addr: 0.5, app_failure_refill: 1m}\n", nil, nil, func(c *broker.Config) string {
			a := c.Auth
			if a.AppConcurrency != 2 || a.AppRate != 2.5 || a.AppRatePerAddr != 0.5 || a.AppFailureRefill != time.Minute ||
				a.AppConcurrencyPerAddr != 1 || a.AppFailuresPerAddr != 20 {
				return fmt.Sprintf("application budgets not applied: %+v", a)
			}
			return ""
		}},
		{"vault address and token from VAULT_ env", "store.type: vault\n", map[string]string{"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_TOKEN": "root"}, nil, func(c *broker.Config) string {
			if c.Store.Vault.Address != "http://127.0.0.1:8200" || c.Store.Vault.Token != "root" {
				return "VAULT_ADDR/VAULT_TOKEN not used"
			}
			return ""
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.check == nil {
				// M2MGUARD_CONFIG pointing to a missing file names the source.
				_, err := resolve(t, "", map[string]string{"M2MGUARD_CONFIG": filepath.Join(t.TempDir(), "missing.yaml")})
				if err == nil || !strings.Contains(err.Error(), "env M2MGUARD_CONFIG") {
					t.Fatalf("err = %v, want one naming env M2MGUARD_CONFIG", err)
				}
				return
			}
			c, err := resolve(t, tc.yaml, tc.env, tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if msg := tc.check(c); msg != "" {
				t.Fatal(msg)
			}
		})
	}
}

// vaultYAML is a valid Vault store, for the cases that need one.
const vaultYAML = "store: {type: vault, vault: {address: \"http://127.0.0.1:8200\", token: t}}\n"

func TestConfigErrorsNameTheKey(t *testing.T) {
	for _, tc := range []struct {
		name    string
		yaml    string
		env     map[string]string
		args    []string
		key     string
		source  string // substring of the message
		message string // substring of the message
	}{
		{"unknown yaml key", "mqtt:\n  tpc: :1883\n", nil, nil, "mqtt.tpc", "line 2", "unknown key"},
		{"bad duration in yaml", "auth:\n  skew: soon\n", nil, nil, "auth.skew", "line 2", "duration"},
		{"list value", "mqtt:\n  tcp: [a, b]\n", nil, nil, "mqtt.tcp", "line 2", "single value"},
		{"not a mapping", "just a string\n", nil, nil, "(file)", "line 1", "mapping"},
		{"broken yaml", "mqtt: [\n", nil, nil, "(file)", "config file", "YAML"},
		{"bad env", "", map[string]string{"M2MGUARD_LOG_LEVEL": "loud"}, nil, "log.level", "env M2MGUARD_LOG_LEVEL", "debug"},
		{"bad flag", "", nil, []string{"--mqtt-tcp", "1883"}, "mqtt.tcp", "flag --mqtt-tcp", "host:port"},
		{"bad store type", "", nil, []string{"--store-type", "redis"}, "store.type", "flag --store-type", "embedded, vault"},
		{"vault without address", "store.type: vault\n", nil, nil, "store.vault.address", "", "required"},
		{"vault without credentials", "store.type: vault\nstore.vault.address: http://v:8200\n", nil, nil, "store.vault.token", "", "AppRole"},
		{"approle without secret", "store.type: vault\nstore.vault.address: http://v:8200\nstore.vault.approle.role_id: r\n", nil, nil, "store.vault.approle.secret_id_file", "", "secret_id"},
		{"approle and kubernetes", "store.type: vault\nstore.vault.address: http://v:8200\nstore.vault.approle.role_id: r\nstore.vault.approle.secret_id: s\nstore.vault.kubernetes.role: k\n", nil, nil, "store.vault.kubernetes.role", "", "not both"},
		{"secret_id and wrapping token", "store.type: vault\nstore.vault.address: http://v:8200\nstore.vault.approle.role_id: r\nstore.vault.approle.secret_id_file: s\n", map[string]string{"M2MGUARD_STORE_VAULT_APPROLE_WRAPPING_TOKEN_FILE": "w"}, nil, "store.vault.approle.secret_id_file", "", "wrapping_token_file"},
		{"wrapping token without role_id", "store.type: vault\nstore.vault.address: http://v:8200\nstore.vault.approle.wrapping_token_file: w\n", nil, nil, "store.vault.approle.role_id", "", "wrapping token"},
		{"kubernetes with a secret_id", "store.type: vault\nstore.vault.address: http://v:8200\nstore.vault.kubernetes.role: k\nstore.vault.approle.secret_id: s\n", nil, nil, "store.vault.kubernetes.role", "", "neither"},
		{"kubernetes without token file", "store.type: vault\nstore.vault.address: http://v:8200\nstore.vault.kubernetes: {role: k, token_file: ''}\n", nil, nil, "store.vault.kubernetes.token_file", "", "empty"},
		{"sms backoff above its max", "sms: {backoff: 10s, max_backoff: 1s}\n", nil, nil, "sms.max_backoff", "", "sms.backoff"},
		{"sms timeout zero", "", nil, []string{"--sms-timeout", "0s"}, "sms.timeout", "", "positive"},
		{"vault address not a URL", "store.type: vault\nstore.vault.address: vault:8200\nstore.vault.token: t\n", nil, nil, "store.vault.address", "", "URL"},
		{"cert without key", "", nil, []string{"--mqtt-tls-cert", "c.pem"}, "mqtt.tls_key", "", "together"},
		{"short admin token", "", map[string]string{"M2MGUARD_ADMIN_TOKEN": "short"}, nil, "admin.token", "", "16"},
		{"no listener", "mqtt: {tcp: \"off\", ws: \"off\"}\n", nil, nil, "mqtt.tcp", "", "no MQTT listener"},
		{"tiny queue", "", nil, []string{"--mqtt-max-writes-pending", "2"}, "mqtt.max_writes_pending", "flag", "16"},
		{"application rate not a number", "", map[string]string{"M2MGUARD_AUTH_APP_RATE": "fast"}, nil, "auth.app_rate", "env M2MGUARD_AUTH_APP_RATE", "number"},
		{"no application rate per address", "", nil, []string{"--auth-app-rate-per-addr", "0"}, "auth.app_rate_per_addr", "flag", "0.001"},
		{"no failure refill", "auth.app_failure_refill: 0s\n", nil, nil, "auth.app_failure_refill", "", "positive"},
		{"throttle max below base", "auth: {throttle_base: 1m, throttle_max: 1s}\n", nil, nil, "auth.throttle_max", "", "throttle_base"},
		// Fleet mode (README, "Fleet mode").
		{"fleet on the embedded store", "cluster: {embedded_nats: true, broker_id: b1}\n", nil, nil, "store.type", "", "needs store.type vault"},
		{"fleet on the embedded store, external NATS", "", map[string]string{"M2MGUARD_CLUSTER_NATS_URLS": "nats://127.0.0.1:4222"}, []string{"--cluster-broker-id", "b1"}, "store.type", "", "needs store.type vault"},
		{"routes without an embedded node", "cluster.embedded.routes: nats-route://10.0.0.2:6222\n", nil, nil, "cluster.embedded.routes", "", "embedded_nats"},
		{"bad broker id", vaultYAML + "cluster: {embedded_nats: true, broker_id: \"a b\"}\n", nil, nil, "cluster.broker_id", "", "A-Za-z0-9"},
		{"two kinds of NATS credentials", vaultYAML + "cluster: {nats_urls: \"nats://127.0.0.1:4222\", broker_id: b1, nats_user: u, nats_password: p, nats_token_file: t}\n", nil, nil, "cluster.nats_user", "", "one kind"},
		{"NATS password without user", vaultYAML + "cluster: {nats_urls: \"nats://127.0.0.1:4222\", broker_id: b1, nats_password: p}\n", nil, nil, "cluster.nats_user", "", "together"},
		{"embedded node with a creds file", vaultYAML + "cluster: {embedded_nats: true, broker_id: b1, nats_creds_file: c}\n", nil, nil, "cluster.nats_nkey_file", "", "not nkeys"},
		{"embedded routes without a route listener", vaultYAML + "cluster: {embedded_nats: true, broker_id: b1, embedded: {cluster_listen: \"\", routes: \"nats-route://127.0.0.1:6222\"}}\n", nil, nil, "cluster.embedded.cluster_listen", "", "route listener"},
		{"route password without user", vaultYAML + "cluster: {embedded_nats: true, broker_id: b1, embedded: {route_password: p}}\n", nil, nil, "cluster.embedded.route_user", "", "together"},
		{"claim timeout zero", vaultYAML + "cluster: {embedded_nats: true, broker_id: b1, claim_timeout: 0s}\n", nil, nil, "cluster.claim_timeout", "", "positive"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := resolve(t, tc.yaml, tc.env, tc.args...)
			var ce *broker.ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("err = %v, want a *ConfigError", err)
			}
			if ce.Key != tc.key {
				t.Errorf("key = %q, want %q (%v)", ce.Key, tc.key, err)
			}
			if !strings.Contains(err.Error(), tc.source) || !strings.Contains(err.Error(), tc.message) {
				t.Errorf("error %q: want %q and %q in it", err, tc.source, tc.message)
			}
		})
	}
}

func TestConfigSecretsNotInErrors(t *testing.T) {
	// A secret given where a number is expected must not be echoed.
	_, err := resolve(t, "", map[string]string{"M2MGUARD_SMS_RETRIES": "hunter2-secret"})
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("err = %v", err)
	}
}

func TestReferenceListsEveryKey(t *testing.T) {
	ref := broker.Reference()
	for _, f := range broker.Fields() {
		for _, s := range []string{"`" + f.Key + "`", "`" + f.Env() + "`", "`--" + f.Flag() + "`"} {
			if !strings.Contains(ref, s) {
				t.Errorf("reference lacks %s", s)
			}
		}
	}
}

// TestReadmeDocumentsEveryKey keeps the README's configuration reference
// in step with the code.
func TestReadmeDocumentsEveryKey(t *testing.T) {
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Skip("no README")
	}
	for _, f := range broker.Fields() {
		for _, s := range []string{"`" + f.Key + "`", "`" + f.Env() + "`", "`--" + f.Flag() + "`"} {
			if !strings.Contains(string(data), s) {
				t.Errorf("README lacks %s", s)
			}
		}
	}
}

// TestReadmeHasTheReference keeps the README's configuration table equal
// to Reference(), the documented defaults included: they are read from
// Default(), which takes them from the libraries, so a changed library
// default shows here.
func TestReadmeHasTheReference(t *testing.T) {
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Skip("no README")
	}
	if ref := broker.Reference(); !strings.Contains(string(data), ref) {
		t.Errorf("README's configuration table is not broker.Reference(); replace it with:\n%s", ref)
	}
}

func FuzzApplyYAML(f *testing.F) {
	f.Add([]byte("mqtt:\n  tcp: \":1883\"\n"))
	f.Add([]byte("store: {type: vault, vault: {address: 'http://v:8200', token: t}}\n"))
	f.Add([]byte("auth.skew: 5m\nlog: {level: debug}\n"))
	f.Add([]byte("a: &x {b: 1}\nc: *x\n"))
	f.Add([]byte("- 1\n- 2\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c := broker.Default()
		err := c.ApplyYAML(data, "fuzz")
		if err != nil {
			var ce *broker.ConfigError
			if !errors.As(err, &ce) || ce.Key == "" {
				t.Fatalf("error %v is not a ConfigError with a key", err)
			}
			return
		}
		// Whatever applies either validates or fails naming a key.
		if err := c.Validate(); err != nil {
			var ce *broker.ConfigError
			if !errors.As(err, &ce) || ce.Key == "" {
				t.Fatalf("validate error %v is not a ConfigError with a key", err)
			}
		}
	})
}

func ExampleResolve() {
	fs := pflag.NewFlagSet("m2mguard-broker", pflag.ContinueOnError)
	broker.AddFlags(fs)
	fs.Parse([]string{"--mqtt-tcp", "127.0.0.1:1883", "--admin-listen", "off"})
	env := map[string]string{"M2MGUARD_LOG_FORMAT": "json"}
	cfg, err := broker.Resolve(fs, func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err != nil {
		panic(err)
	}
	fmt.Println(cfg.MQTT.TCP, cfg.Log.Format)
	_, err = broker.Resolve(pflagWith("--auth-skew", "soon"), func(string) (string, bool) { return "", false })
	fmt.Println(err)
	// Output:
	// 127.0.0.1:1883 json
	// config key auth.skew (flag --auth-skew): want a duration such as 30s, 5m or 24h
}

func pflagWith(args ...string) *pflag.FlagSet {
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	broker.AddFlags(fs)
	fs.Parse(args)
	return fs
}

// TestDocumentedEnvVarsExist checks every M2MGUARD_ variable the README,
// the Dockerfile and the compose files mention against the real keys.
func TestDocumentedEnvVarsExist(t *testing.T) {
	known := map[string]bool{broker.EnvConfig: true, "M2MGUARD_MASTER_KEY": true,
		"M2MGUARD_VAULT_BIN": true, "M2MGUARD_MEASURE": true, "M2MGUARD_MEASURE_N": true,
		haproxytest.EnvInstall: true, natstest.EnvRaft: true,
		// Not variables: the fleet's NATS buckets (README, "Fleet mode").
		fleet.ReplayBucket: true, fleetlink.ChangeBucket: true, fleetroute.DownlinkStream: true,
		fleetroute.UplinkStream: true, fleetroute.RetainedStream: true}
	for _, f := range broker.Fields() {
		known[f.Env()] = true
	}
	re := regexp.MustCompile(`M2MGUARD_[A-Z0-9_]+`)
	for _, file := range []string{"../README.md", "../Dockerfile", "../docker-compose.yml", "../docker-compose.fleet.yml"} {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Errorf("%s: %v", file, err)
			continue
		}
		for _, v := range re.FindAllString(string(data), -1) {
			if !known[v] {
				t.Errorf("%s mentions %s, which is no configuration variable", file, v)
			}
		}
	}
}

// TestConfigFleetDefaults: fleet mode derives the broker id from the host
// name and the embedded node's store from data_dir; routes and NATS URLs
// are comma-separated lists.
func TestConfigFleetDefaults(t *testing.T) {
	cfg, err := resolve(t, vaultYAML+"data_dir: /var/lib/m2mguard\ncluster:\n  embedded_nats: true\n  nats_user: m2mguard\n  nats_password: pw\n",
		map[string]string{"M2MGUARD_CLUSTER_EMBEDDED_ROUTES": "nats-route://10.0.0.1:6222,nats-route://10.0.0.2:6222"})
	if err != nil {
		t.Fatal(err)
	}
	c := cfg.Cluster
	if !c.Enabled() || c.Embedded.StoreDir != filepath.Join("/var/lib/m2mguard", "nats") || len(c.Embedded.Routes) != 2 {
		t.Errorf("cluster = %+v", c)
	}
	if host, err := os.Hostname(); err == nil && host != "" && c.BrokerID == "" {
		t.Errorf("broker id not derived from the host name %q", host)
	}
	off, err := resolve(t, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if off.Cluster.Enabled() || off.Cluster.BrokerID != "" || off.Cluster.Embedded.StoreDir != "" {
		t.Errorf("single broker: cluster = %+v", off.Cluster)
	}
}

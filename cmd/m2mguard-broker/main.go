// Command m2mguard-broker runs the m2mguard MQTT broker: mochi-mqtt with
// the M2M1 authentication hook, the key service on the embedded store or
// HashiCorp Vault, and the admin HTTP API.
//
// With no configuration at all it stores terminals in ./data (created on
// first run), listens for MQTT on :1883 (TCP) and :8083 (WebSocket), and
// serves the admin API on 127.0.0.1:8080 with a token generated into
// ./data/admin.token. Every setting is a YAML key, an environment variable
// and a flag; run with --help for the list.
//
// Exit codes: 0 clean shutdown (SIGINT or SIGTERM), 1 failure while
// starting (e.g. a port already in use) or running, 2 configuration or usage
// error (the message names the key). --check validates the configuration,
// $M2MGUARD_MASTER_KEY included, and exits.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/pflag"

	"github.com/m2mguard/m2mguard/broker"
)

const (
	exitOK      = 0
	exitFailure = 1
	exitConfig  = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.LookupEnv)
	stop()
	os.Exit(code)
}

const intro = `m2mguard-broker runs the m2mguard MQTT broker: mochi-mqtt with the M2M1
authentication hook (docs/SPEC.md), the key service and the admin HTTP API.

Usage:
  m2mguard-broker [--config FILE] [flags]

With no configuration it needs nothing else:
  - store "embedded": an encrypted file in ./data (data_dir, created 0700 on first run);
    its master key comes from $M2MGUARD_MASTER_KEY (base64 of 32 bytes) or from
    ./data/master.key, generated with mode 0600 on first run. Keep that key: without it
    the store cannot be opened.
  - MQTT listeners: TCP :1883, WebSocket :8083 (ws://host:8083/mqtt, any path);
    TLS :8883 only when mqtt.tls_cert and mqtt.tls_key are set (WebSocket is then wss).
  - admin API on 127.0.0.1:8080, bearer token from admin.token or ./data/admin.token
    (generated 0600 on first run; the log names the file, never the token). /healthz on
    the same listener needs no token; /metrics needs the token of ./data/metrics.token
    (admin.metrics_token_file, generated alike) or the admin token. Use m2mctl to drive it.

Store "vault" (store.type: vault) keeps terminals in Vault KV v2 under
<mount>/<prefix>/terminals/<sn> and authenticates with a token (store.vault.token,
token_file, or $VAULT_TOKEN) or AppRole (store.vault.approle.role_id[_file] and
secret_id_file or $M2MGUARD_STORE_VAULT_APPROLE_SECRET_ID); store.vault.address
defaults to $VAULT_ADDR. The broker's Vault policy is deploy/vault/broker.hcl.

Configuration layers, each overriding the one before: defaults, the YAML file
(--config or $M2MGUARD_CONFIG), environment variables, flags. YAML keys nest
(store: {type: vault}) or are written dotted (store.type: vault). The variable of a
key is M2MGUARD_ + the key in upper case with "." as "_"; its flag is the key with
"." and "_" as "-". Durations are Go durations (30s, 5m, 24h).

Exit codes:
  0  clean shutdown (SIGINT or SIGTERM)
  1  failure while starting or running (e.g. store unreachable, port taken)
  2  configuration or usage error: the message names the offending key
`

func usage(w io.Writer, fs *pflag.FlagSet) {
	fmt.Fprint(w, intro)
	fmt.Fprintln(w, "\nKeys (YAML key, environment variable, default, meaning; flag = --key with - for . and _):")
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	for _, f := range broker.Fields() {
		def := f.Default
		if def == "" {
			def = "-"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", f.Key, f.Env(), def, f.Help)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nFlags:")
	fmt.Fprint(w, fs.FlagUsages())
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer, lookup func(string) (string, bool)) int {
	fs := pflag.NewFlagSet("m2mguard-broker", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(io.Discard)
	broker.AddFlags(fs)
	check := fs.Bool("check", false, "validate the configuration and exit (0 if valid)")
	help := fs.BoolP("help", "h", false, "show this help")
	if err := fs.Parse(args); err != nil {
		fmt.Fprintln(stderr, "m2mguard-broker:", err)
		fmt.Fprintln(stderr, "Run 'm2mguard-broker --help' for usage.")
		return exitConfig
	}
	if *help {
		usage(stdout, fs)
		return exitOK
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "m2mguard-broker: unexpected argument %q (every setting is a --flag)\n", fs.Arg(0))
		return exitConfig
	}
	cfg, err := broker.Resolve(fs, lookup)
	if err != nil {
		fmt.Fprintln(stderr, "m2mguard-broker:", err)
		return exitConfig
	}
	if *check {
		if err := broker.Check(cfg, lookup); err != nil {
			fmt.Fprintln(stderr, "m2mguard-broker:", err)
			return exitConfig
		}
		fmt.Fprintln(stdout, "configuration ok")
		return exitOK
	}
	logger := broker.NewLogger(cfg.Log, stderr)
	if err := broker.Run(ctx, cfg, logger); err != nil {
		// Reported once, in the log's format.
		var ce *broker.ConfigError
		var oe *net.OpError
		switch {
		case errors.As(err, &oe):
			// A listen address taken or not available here: the value is
			// well-formed, starting failed.
			attrs := []any{"err", oe.Error()}
			if errors.As(err, &ce) {
				attrs = append([]any{"key", ce.Key}, attrs...)
			}
			logger.Error("broker failed to start", attrs...)
			return exitFailure
		case errors.As(err, &ce):
			logger.Error("configuration error", "key", ce.Key, "err", strings.TrimPrefix(ce.Error(), "config key "+ce.Key+": "))
			return exitConfig
		}
		logger.Error("broker failed", "err", err.Error())
		return exitFailure
	}
	return exitOK
}

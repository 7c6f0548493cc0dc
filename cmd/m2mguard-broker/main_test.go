package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/freeport"
	"github.com/m2mguard/m2mguard/internal/syncbuf"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

func lookup(env map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := env[k]; return v, ok }
}

func TestUsageAndConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		args   []string
		env    map[string]string
		code   int
		stdout string
		stderr string
	}{
		{"help", []string{"--help"}, nil, exitOK, "M2MGUARD_STORE_VAULT_APPROLE_SECRET_ID", ""},
		{"help names exit codes", []string{"-h"}, nil, exitOK, "Exit codes", ""},
		{"check", []string{"--check"}, nil, exitOK, "configuration ok", ""},
		{"unknown flag", []string{"--nope"}, nil, exitConfig, "", "unknown flag"},
		{"argument", []string{"serve"}, nil, exitConfig, "", "unexpected argument"},
		{"bad flag value", []string{"--mqtt-tcp", "x"}, nil, exitConfig, "", "config key mqtt.tcp (flag --mqtt-tcp)"},
		{"bad env", nil, map[string]string{"M2MGUARD_STORE_TYPE": "redis"}, exitConfig, "", "config key store.type (env M2MGUARD_STORE_TYPE)"},
		{"vault without address", []string{"--store-type", "vault"}, nil, exitConfig, "", "config key store.vault.address"},
		{"missing config file", []string{"--config", "/nonexistent.yaml"}, nil, exitConfig, "", "flag --config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(context.Background(), tc.args, &out, &errb, lookup(tc.env))
			if code != tc.code || !strings.Contains(out.String(), tc.stdout) || !strings.Contains(errb.String(), tc.stderr) {
				t.Fatalf("exit %d (want %d)\nstdout: %s\nstderr: %s", code, tc.code, out.String(), errb.String())
			}
		})
	}
}

// TestSmoke builds the binary, runs it in an empty directory with no
// configuration (only free ports), registers a terminal over the admin API,
// connects it, changes all its credentials while it is connected, refuses a
// wrong login, and stops the broker with SIGTERM. Then it scans everything
// the product wrote — the broker's log at debug level (mochi's included),
// /metrics and the client library's log — for every secret of the run: the
// admin and metrics tokens, both sets of passwords and basic keys (hex and base64).
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	bin := buildBinary(t)
	work := t.TempDir()
	mqttAddr, adminAddr, wsAddr := freeport.Addr(t), freeport.Addr(t), freeport.Addr(t)
	cmd := exec.Command(bin, "--mqtt-tcp", mqttAddr, "--mqtt-ws", wsAddr, "--log-level", "debug")
	cmd.Dir = work
	cmd.Env = append(os.Environ(), "M2MGUARD_ADMIN_LISTEN="+adminAddr)
	logs := &syncbuf.Buffer{} // written by the process's stderr copier, read here
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-exited
		}
	})

	// Wait for /healthz.
	base := "http://" + adminAddr
	var exitErr error
	died := false
	if !testwait.Until(60*time.Second, func() bool {
		select {
		case exitErr = <-exited:
			died = true
			return true
		default:
		}
		resp, err := http.Get(base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}) || died {
		t.Fatalf("broker not healthy within 60 s (exited: %v %v)\n%s", died, exitErr, logs.String())
	}

	tok, err := os.ReadFile(filepath.Join(work, "data", "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"master.key", "admin.token", "metrics.token"} {
		if fi, err := os.Stat(filepath.Join(work, "data", f)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("data/%s: %v %v", f, fi, err)
		}
	}
	api := adminClient(t, base, work)
	b, err := api.Register(t.Context(), adminapi.RegisterRequest{SN: "S1", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil || b.BrokerURL != "tcp://"+mqttAddr {
		t.Fatalf("register: %v %+v", err, b)
	}

	// The terminal logs in with a session key, over TCP and over WebSocket.
	bk, _ := hex.DecodeString(b.BK)
	rec := &client.Record{Identity: codec.Identity{SN: b.SN, IMEI: b.IMEI, IMSI: b.IMSI}, Alg: codec.HS256,
		Current: client.Credentials{Up: []byte(b.Up), UpExp: b.UpExp, Down: []byte(b.Down), DownExp: b.DownExp, BK: bk, BKExp: b.BKExp}}
	var clientLog syncbuf.Buffer
	store := client.NewMemStore(rec)
	var last *client.Client
	for _, url := range []string{b.BrokerURL, "ws://" + wsAddr + "/mqtt"} {
		c, err := client.New(client.Config{Brokers: []string{url}, Identity: rec.Identity, Alg: rec.Alg,
			Store: store, SessionKey: true, CleanSession: true,
			Logger: slog.New(slog.NewTextHandler(&clientLog, &slog.HandlerOptions{Level: slog.LevelDebug}))})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		if err := c.Connect(ctx); err != nil {
			t.Fatalf("%s: %v\n%s", url, err, logs.String())
		}
		if err := c.Publish(ctx, "temp", []byte(`{"t":21.5}`), 1); err != nil {
			t.Fatalf("%s: publish: %v", url, err)
		}
		cancel()
		if !c.Session().Encrypted {
			t.Errorf("%s: no session key", url)
		}
		if url == b.BrokerURL {
			c.Close()
		} else {
			last = c
		}
	}

	// An operator changes every credential of the connected terminal; the
	// client applies, acknowledges and reconnects with the new values.
	if _, err := api.StartChange(t.Context(), "S1", "all"); err != nil {
		t.Fatalf("change start: %v", err)
	}
	var after *client.Record
	if !testwait.Until(30*time.Second, func() bool {
		after, _ = store.Load()
		return after.Pending == nil && string(after.Current.Up) != b.Up
	}) {
		t.Fatalf("the change did not complete\n%s", logs.String())
	}
	last.Close()
	// A wrong password is refused (and logged, without the password).
	bad, _ := client.New(client.Config{Brokers: []string{b.BrokerURL}, Identity: rec.Identity, Alg: rec.Alg,
		Store: client.NewMemStore(rec), CleanSession: true}) // the old values, void now
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	if err := bad.Connect(ctx); !errors.Is(err, client.ErrRefused) {
		t.Fatalf("old password after the change: %v, want refused", err)
	}
	cancel()
	bad.Close()
	// /metrics with the generated metrics token (what a Prometheus scrape sends).
	mtok, err := os.ReadFile(filepath.Join(work, "data", "metrics.token"))
	if err != nil {
		t.Fatal(err)
	}
	scraper, err := adminapi.New(base, "", &adminapi.Options{MetricsToken: strings.TrimSpace(string(mtok))})
	if err != nil {
		t.Fatal(err)
	}
	metrics, err := scraper.Metrics(t.Context())
	if err != nil || !strings.Contains(string(metrics), "m2mguard_logins_total") {
		t.Fatalf("/metrics with the metrics token: %v %.200s", err, metrics)
	}

	// SIGTERM: a clean exit with status 0.
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit: %v\n%s", err, logs.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("no exit after SIGTERM\n%s", logs.String())
	}
	out := logs.String()
	for _, want := range []string{"broker started", "admin token generated", "stopped"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	newBK := hex.EncodeToString(after.Current.BK)
	secrets := []string{strings.TrimSpace(string(tok)), strings.TrimSpace(string(mtok)), b.Up, b.Down, b.BK, string(after.Current.Up), string(after.Current.Down), newBK,
		base64.RawURLEncoding.EncodeToString(bk), base64.RawURLEncoding.EncodeToString(after.Current.BK)}
	for name, text := range map[string]string{"broker log": out, "metrics": string(metrics), "client log": clientLog.String()} {
		if len(text) == 0 {
			t.Errorf("%s is empty: the scan would prove nothing", name)
		}
		for i, secret := range secrets {
			if strings.Contains(text, secret) {
				t.Errorf("secret %d appears in the %s", i, name)
			}
		}
	}
}

// TestPortInUseIsAStartFailure: a listen address already taken is a
// failure while starting (exit 1, as documented), not a configuration
// error (2), and it is reported once.
func TestPortInUseIsAStartFailure(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	addr := taken.Addr().String()
	for _, key := range []string{"--mqtt-tcp", "--admin-listen"} {
		args := []string{"--data-dir", filepath.Join(t.TempDir(), "data"), "--mqtt-tcp", "127.0.0.1:0", "--mqtt-ws", "off", "--admin-listen", "127.0.0.1:0"}
		args = append(args, key, addr)
		var out, errb bytes.Buffer
		code := run(context.Background(), args, &out, &errb, lookup(nil))
		if code != exitFailure {
			t.Errorf("%s taken: exit %d, want %d\n%s", key, code, exitFailure, errb.String())
		}
		if n := strings.Count(errb.String(), "address already in use"); n != 1 {
			t.Errorf("%s taken: the error is reported %d times, want once:\n%s", key, n, errb.String())
		}
	}
}

// TestCheckValidatesMasterKey: --check refuses a $M2MGUARD_MASTER_KEY that
// the real start would refuse, naming the variable.
func TestCheckValidatesMasterKey(t *testing.T) {
	good := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32))
	for _, tc := range []struct {
		name, key string
		code      int
	}{
		{"valid", good, exitOK},
		{"not base64", "not a key!", exitConfig},
		{"too short", base64.StdEncoding.EncodeToString([]byte("short")), exitConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("M2MGUARD_MASTER_KEY", tc.key) // the real start reads the process environment
			var out, errb bytes.Buffer
			code := run(context.Background(), []string{"--check", "--data-dir", filepath.Join(t.TempDir(), "data")}, &out, &errb,
				lookup(map[string]string{"M2MGUARD_MASTER_KEY": tc.key}))
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out.String(), errb.String())
			}
			if tc.code != exitOK && !strings.Contains(errb.String(), "M2MGUARD_MASTER_KEY") {
				t.Fatalf("the error does not name the variable: %s", errb.String())
			}
			if strings.Contains(errb.String(), tc.key) {
				t.Fatalf("the error shows the key's value: %s", errb.String())
			}
		})
	}
}

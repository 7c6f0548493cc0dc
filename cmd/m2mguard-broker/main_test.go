package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/broker/admin"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
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

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestSmoke builds the binary, runs it in an empty directory with no
// configuration (only free ports), registers a terminal over the admin API,
// connects it, and stops the broker with SIGTERM.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "m2mguard-broker")
	build := exec.Command("go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	work := filepath.Join(dir, "work")
	os.Mkdir(work, 0o755)
	mqttAddr, adminAddr, wsAddr := freePort(t), freePort(t), freePort(t)
	cmd := exec.Command(bin, "--mqtt-tcp", mqttAddr, "--mqtt-ws", wsAddr)
	cmd.Dir = work
	cmd.Env = append(os.Environ(), "M2MGUARD_ADMIN_LISTEN="+adminAddr)
	var logs bytes.Buffer
	cmd.Stderr = &logs
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
	for {
		resp, err := http.Get(base + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		select {
		case err := <-exited:
			t.Fatalf("broker exited: %v\n%s", err, logs.String())
		case <-time.After(50 * time.Millisecond):
		}
	}

	tok, err := os.ReadFile(filepath.Join(work, "data", "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"master.key", "admin.token"} {
		if fi, err := os.Stat(filepath.Join(work, "data", f)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("data/%s: %v %v", f, fi, err)
		}
	}
	body, _ := json.Marshal(admin.RegisterRequest{SN: "S1", IMEI: "354494040518570", IMSI: "460020084678120"})
	req, _ := http.NewRequest("POST", base+"/v1/terminals", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var b admin.Bundle
	json.NewDecoder(resp.Body).Decode(&b)
	resp.Body.Close()
	if resp.StatusCode != 201 || b.BrokerURL != "tcp://"+mqttAddr {
		t.Fatalf("register: %d %+v", resp.StatusCode, b.BrokerURL)
	}

	// The terminal logs in with a session key, over TCP and over WebSocket.
	bk, _ := hex.DecodeString(b.BK)
	rec := &client.Record{Identity: codec.Identity{SN: b.SN, IMEI: b.IMEI, IMSI: b.IMSI}, Alg: codec.HS256,
		Current: client.Credentials{Up: []byte(b.Up), UpExp: b.UpExp, Down: []byte(b.Down), DownExp: b.DownExp, BK: bk, BKExp: b.BKExp}}
	for _, url := range []string{b.BrokerURL, "ws://" + wsAddr + "/mqtt"} {
		c, err := client.New(client.Config{Brokers: []string{url}, Identity: rec.Identity, Alg: rec.Alg,
			Store: client.NewMemStore(rec), SessionKey: true, CleanSession: true})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
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
		c.Close()
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
	for _, secret := range []string{strings.TrimSpace(string(tok)), b.Up, b.Down, b.BK} {
		if strings.Contains(out, secret) {
			t.Error("a secret appears in the log")
		}
	}
}

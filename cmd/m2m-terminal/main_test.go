package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
)

// allowAll is mochi's allow-all authentication (its hooks/auth package
// would pull yaml into go.mod).
type allowAll struct{ mochi.HookBase }

func (allowAll) ID() string { return "allow" }
func (allowAll) Provides(b byte) bool {
	return b == mochi.OnConnectAuthenticate || b == mochi.OnACLCheck
}
func (allowAll) OnConnectAuthenticate(*mochi.Client, packets.Packet) bool { return true }
func (allowAll) OnACLCheck(*mochi.Client, string, bool) bool              { return true }

type refuseAll struct{ mochi.HookBase }

func (refuseAll) ID() string                                               { return "refuse" }
func (refuseAll) Provides(b byte) bool                                     { return b == mochi.OnConnectAuthenticate }
func (refuseAll) OnConnectAuthenticate(*mochi.Client, packets.Packet) bool { return false }

// broker starts a mochi broker with hook h and returns its tcp:// URL and
// a channel of uplink payloads.
func broker(t *testing.T, h mochi.Hook) (string, chan string) {
	t.Helper()
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(h, nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv.AddListener(listeners.NewNet("tcp", ln))
	up := make(chan string, 4)
	srv.Subscribe("m2m/+/up/#", 1, func(_ *mochi.Client, _ packets.Subscription, pk packets.Packet) {
		up <- pk.TopicName + " " + string(pk.Payload)
	})
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })
	return "tcp://" + ln.Addr().String(), up
}

func credsFile(t *testing.T, pending bool) string {
	t.Helper()
	bk, _ := hex.DecodeString("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
	rec := &client.Record{
		Identity: codec.Identity{SN: "CLI0001", IMEI: "354494040518570", IMSI: "460020084678120"}, Alg: codec.MD5,
		Current: client.Credentials{Up: []byte("vkwF2SJaQ7mXc4Lp"), UpExp: codec.Never, Down: []byte("Uo3aHCbGz8RtY2Nw"),
			DownExp: 1800000000, BK: bk, BKExp: codec.Never},
	}
	if pending {
		rec.Pending = &client.Pending{RID: 0xabc, Mode: codec.ModeSMS, Params: codec.Params{What: codec.WhatBK, BK: bk, BKExp: codec.Never}}
	}
	path := filepath.Join(t.TempDir(), "creds.json")
	if err := client.NewFileStore(path).Save(rec); err != nil {
		t.Fatal(err)
	}
	return path
}

func runCLI(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestExitCodes(t *testing.T) {
	creds := credsFile(t, false)
	okURL, up := broker(t, new(allowAll))
	refusedURL, _ := broker(t, new(refuseAll))
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	deadURL := "tcp://" + ln.Addr().String()
	ln.Close()
	tests := []struct {
		name string
		args []string
		code int
		out  string
	}{
		{"help", []string{"--help"}, exitOK, "Exit codes"},
		{"unknown command", []string{"fly"}, exitUsage, ""},
		{"unknown flag", []string{"status", "--fly"}, exitUsage, ""},
		{"missing args", []string{"pub", "--creds", creds, "--broker", okURL, "temp"}, exitUsage, ""},
		{"no creds", []string{"pub", "--broker", okURL, "temp", "x"}, exitUsage, ""},
		{"bad what", []string{"rotate", "--creds", creds, "--broker", okURL, "--what", "pin"}, exitUsage, ""},
		{"bad alg", []string{"pub", "--creds", creds, "--broker", okURL, "--alg", "sha1", "t", "x"}, exitUsage, ""},
		{"missing file", []string{"status", "--creds", filepath.Join(t.TempDir(), "none.json")}, exitUsage, ""},
		{"pub ok", []string{"pub", "--creds", creds, "--broker", okURL, "temp", "21.5"}, exitOK, "published 4 bytes on up/temp (plaintext, qos 1)"},
		{"refused", []string{"pub", "--creds", creds, "--broker", refusedURL, "temp", "x"}, exitRefused, ""},
		{"unreachable", []string{"pub", "--creds", creds, "--broker", deadURL, "--timeout", "5s", "temp", "x"}, exitUnreachable, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := runCLI(tc.args...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out, errOut)
			}
			if !strings.Contains(out, tc.out) {
				t.Fatalf("stdout %q lacks %q", out, tc.out)
			}
		})
	}
	if got := <-up; got != "m2m/CLI0001/up/temp 21.5" {
		t.Fatalf("broker got %q", got)
	}
}

func TestEnvFallback(t *testing.T) {
	creds := credsFile(t, false)
	url, up := broker(t, new(allowAll))
	t.Setenv("M2M_BROKER", url)
	t.Setenv("M2M_CREDS", creds)
	t.Setenv("M2M_SN", "ENV0001")
	if code, out, errOut := runCLI("pub", "a", "b"); code != exitOK {
		t.Fatalf("exit %d: %s %s", code, out, errOut)
	}
	if got := <-up; got != "m2m/ENV0001/up/a b" {
		t.Fatalf("broker got %q", got)
	}
}

// TestEnvInvalid: a variable the flag cannot take is a usage error naming
// the variable, not silently ignored.
func TestEnvInvalid(t *testing.T) {
	t.Setenv("M2M_TIMEOUT", "ten seconds")
	code, _, errOut := runCLI("status", "--creds", credsFile(t, false))
	if code != exitUsage || !strings.Contains(errOut, "$M2M_TIMEOUT") {
		t.Fatalf("exit %d, want %d with the variable named; stderr: %s", code, exitUsage, errOut)
	}
}

func TestStatusShowsNoSecrets(t *testing.T) {
	creds := credsFile(t, true)
	code, out, _ := runCLI("status", "--creds", creds)
	if code != exitOK {
		t.Fatalf("exit %d", code)
	}
	for _, want := range []string{"CLI0001", "md5", "never", "rid 0000000000000abc, what bk, mode sms"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	for _, secret := range []string{"vkwF2SJaQ7mXc4Lp", "Uo3aHCbGz8RtY2Nw", "00112233", "ABEiM0RV"} {
		if strings.Contains(out, secret) {
			t.Errorf("status shows a secret:\n%s", out)
		}
	}
}

// TestBrokerFromCredsFile: the credential file m2mctl writes names the
// broker; m2m-terminal uses it when --broker is not given, and --broker
// still wins.
func TestBrokerFromCredsFile(t *testing.T) {
	url, up := broker(t, new(allowAll))
	creds := credsFile(t, false)
	fs := client.NewFileStore(creds)
	rec, err := fs.Load()
	if err != nil {
		t.Fatal(err)
	}
	rec.BrokerURL = url
	if err := fs.Save(rec); err != nil {
		t.Fatal(err)
	}
	if code, out, errOut := runCLI("pub", "--creds", creds, "temp", "1"); code != exitOK {
		t.Fatalf("without --broker: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	if got := <-up; got != "m2m/CLI0001/up/temp 1" {
		t.Fatalf("broker got %q", got)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := "tcp://" + ln.Addr().String()
	ln.Close()
	if code, _, errOut := runCLI("pub", "--creds", creds, "--broker", dead, "--timeout", "3s", "temp", "1"); code != exitUnreachable {
		t.Fatalf("--broker must override the file's broker: exit %d: %s", code, errOut)
	}
	// A file without a broker (written before it was stored) still needs --broker.
	old := credsFile(t, false)
	if code, _, errOut := runCLI("pub", "--creds", old, "temp", "1"); code != exitUsage || !strings.Contains(errOut, "--broker") {
		t.Fatalf("file without broker: exit %d: %s", code, errOut)
	}
}

// TestCredsFileProblemsAreUsageErrors: a missing or damaged credential file
// is a usage error (exit 2) that names the file and what is wrong with it;
// a file others can read is used, with a warning naming it and chmod 600.
func TestCredsFileProblemsAreUsageErrors(t *testing.T) {
	url, _ := broker(t, new(allowAll))
	dir := t.TempDir()
	missing := filepath.Join(dir, "a1.json")
	corrupt := filepath.Join(dir, "corrupt.json")
	os.WriteFile(corrupt, []byte("{\"version\": 1, \"current\": {\"up\": \"short\"}"), 0o600)
	notCreds := filepath.Join(dir, "other.json")
	os.WriteFile(notCreds, []byte(`{"hello": "world"}`), 0o600)
	for _, tc := range []struct {
		name, file, want string
	}{
		{"missing", missing, "credential file " + missing + " does not exist"},
		{"corrupt", corrupt, "credential file " + corrupt + " is not valid"},
		{"not a credential file", notCreds, "credential file " + notCreds + " is not valid"},
	} {
		for _, cmd := range []string{"pub", "status"} {
			args := []string{cmd, "--creds", tc.file}
			if cmd == "pub" {
				args = append(args, "--broker", url, "temp", "1")
			}
			code, _, errOut := runCLI(args...)
			if code != exitUsage || !strings.Contains(errOut, tc.want) {
				t.Errorf("%s, %s: exit %d (want %d), stderr %q lacks %q", tc.name, cmd, code, exitUsage, errOut, tc.want)
			}
		}
	}
	open := credsFile(t, false)
	if err := os.Chmod(open, 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := runCLI("pub", "--creds", open, "--broker", url, "temp", "1")
	if code != exitOK || !strings.Contains(errOut, open) || !strings.Contains(errOut, "chmod 600") {
		t.Fatalf("mode 0644: exit %d, stderr %q: want a warning naming the file and chmod 600", code, errOut)
	}
}

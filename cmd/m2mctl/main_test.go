package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/lastseen"
)

// startBroker runs a real broker with its admin API on a loopback port and
// returns the admin URL and the token file.
func startBroker(t *testing.T) (string, string) {
	t.Helper()
	cfg := broker.Default()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.MQTT.TCP, cfg.MQTT.WS, cfg.Admin.Listen = "127.0.0.1:0", "", "127.0.0.1:0"
	b, err := broker.Start(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return "http://" + b.Addr("admin"), filepath.Join(cfg.DataDir, "admin.token")
}

func ctl(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, strings.NewReader(stdin), &out, &errb)
	return code, out.String(), errb.String()
}

func TestCommands(t *testing.T) {
	server, tokenFile := startBroker(t)
	htmlServer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, "<!DOCTYPE html><html><body><h1>Not Found</h1></body></html>")
	}))
	t.Cleanup(htmlServer.Close)
	creds := filepath.Join(t.TempDir(), "t1.json")
	g := []string{"--server", server, "--token-file", tokenFile}
	emptyTokenFile := filepath.Join(t.TempDir(), "empty.token")
	os.WriteFile(emptyTokenFile, []byte("\n"), 0o600)
	wrongTokenFile := filepath.Join(t.TempDir(), "wrong.token")
	os.WriteFile(wrongTokenFile, []byte("wrong-token-0123456789\n"), 0o600)
	for _, tc := range []struct {
		name    string
		args    []string
		stdin   string
		code    int
		stdout  string // substring
		stderr  string // substring
		notOut  string
		jsonOut bool // stdout must be JSON
	}{
		{name: "add", args: []string{"terminal", "add", "--sn", "T1", "--imei", "354494040518570", "--imsi", "460020084678120", "--creds", creds}, stdout: "bk  "},
		{name: "add json", args: []string{"terminal", "add", "--sn", "T2", "--imei", "354494040518571", "--imsi", "460020084678121", "--alg", "md5", "-o", "json"}, stdout: `"down":`, jsonOut: true},
		{name: "add exists", args: []string{"terminal", "add", "--sn", "T1", "--imei", "354494040518570", "--imsi", "460020084678120"}, code: exitConflict, stderr: "terminal T1 already exists"},
		{name: "add missing flag", args: []string{"terminal", "add", "--sn", "T3"}, code: exitUsage, stderr: "--imei"},
		{name: "add bad imei", args: []string{"terminal", "add", "--sn", "T3", "--imei", "1", "--imsi", "460020084678120"}, code: exitUsage, stderr: "HTTP 400"},
		{name: "get", args: []string{"terminal", "get", "T1"}, stdout: "status              active", notOut: "bk  "},
		{name: "get json", args: []string{"terminal", "get", "T1", "-o", "json"}, stdout: `"sn": "T1"`, jsonOut: true},
		{name: "get unknown", args: []string{"terminal", "get", "T9"}, code: exitNotFound, stderr: "m2mctl: terminal T9 not found (HTTP 404)\n"},
		{name: "get bad sn", args: []string{"terminal", "get", "a-b"}, code: exitUsage},
		{name: "list", args: []string{"terminal", "list"}, stdout: "T2  354494040518571"},
		{name: "list page", args: []string{"terminal", "list", "--limit", "1"}, stdout: "T1", notOut: "\nT2 ", stderr: "--after T1"},
		{name: "list all", args: []string{"terminal", "list", "--limit", "1", "--all", "-o", "json"}, stdout: `"sn": "T2"`, jsonOut: true},
		{name: "disable", args: []string{"terminal", "disable", "T2"}, stdout: "T2 is disabled"},
		{name: "enable", args: []string{"terminal", "enable", "T2"}, stdout: "T2 is active"},
		{name: "change start", args: []string{"change", "start", "T2", "--what", "pwd"}, stdout: "origin     operator"},
		{name: "change busy", args: []string{"change", "start", "T2"}, code: exitConflict},
		{name: "change status json", args: []string{"change", "status", "T2", "-o", "json"}, stdout: `"what": "pwd"`, jsonOut: true},
		{name: "change status none", args: []string{"change", "status", "T1"}, code: exitNotFound},
		{name: "change bad what", args: []string{"change", "start", "T1", "--what", "x"}, code: exitUsage},
		{name: "disable cancels the change", args: []string{"terminal", "disable", "T2"}, stdout: "T2 is disabled"},
		{name: "change cancelled", args: []string{"change", "status", "T2"}, code: exitNotFound},
		{name: "no change while disabled", args: []string{"change", "start", "T2"}, code: exitConflict, stderr: "disabled"},
		{name: "rekey", args: []string{"terminal", "rekey", "T1", "--creds", creds}, stdout: "credential file " + creds + " written"},
		{name: "rekey json", args: []string{"terminal", "rekey", "T2", "-o", "json"}, stdout: `"bk":`, jsonOut: true},
		{name: "rekey other terminal's file", args: []string{"terminal", "rekey", "T2", "--creds", creds}, code: exitUsage, stderr: "not the credential file of terminal T2"},
		{name: "rekey unknown", args: []string{"terminal", "rekey", "T9"}, code: exitNotFound},
		{name: "delete", args: []string{"terminal", "delete", "T2"}, stdout: "deleted"},
		{name: "import", args: []string{"terminal", "import", "-", "--progress", "always"}, stdin: "sn,imei,imsi,msisdn,alg\nI1,354494040518572,460020084678122,,\nI1,354494040518573,460020084678123,,\n",
			code: exitFailure, stdout: "rows 2, created 1, rejected 1", stderr: "importing [##############################] 2/2 100%"},
		{name: "import without optional columns", args: []string{"terminal", "import", "-"}, stdin: "imsi,sn,imei\n460020084678126,I6,354494040518576\n", stdout: "rows 1, created 1, rejected 0"},
		{name: "import header without imsi", args: []string{"terminal", "import", "-"}, stdin: "sn,imei\nI7,354494040518577\n", code: exitUsage, stderr: `import: missing column "imsi"`},
		{name: "import json", args: []string{"terminal", "import", "-", "-o", "json"}, stdin: "sn,imei,imsi,msisdn,alg\nI2,354494040518574,460020084678124,,\n", stdout: `"created": 1`, jsonOut: true},
		{name: "campaign no selection", args: []string{"change", "campaign", "start", "--what", "pwd"}, code: exitUsage, stderr: "exactly one selection"},
		{name: "campaign two selections", args: []string{"change", "campaign", "start", "--all", "--status", "active", "--what", "pwd"}, code: exitUsage, stderr: "exactly one selection"},
		{name: "campaign bad what", args: []string{"change", "campaign", "start", "--all", "--what", "x"}, code: exitUsage, stderr: "--what"},
		{name: "campaign bad rate", args: []string{"change", "campaign", "start", "--all", "--what", "pwd", "--rate", "fast"}, code: exitUsage, stderr: "--rate"},
		{name: "campaign rate above max", args: []string{"change", "campaign", "start", "--all", "--what", "pwd", "--rate", "100000"}, code: exitUsage, stderr: "campaigns.max_rate"},
		{name: "campaign start list", args: []string{"change", "campaign", "start", "--list", "-", "--what", "pwd", "--rate", "high"}, stdin: "# two terminals\nI1\n\nI2\n",
			stdout: "what         pwd"},
		{name: "campaign list", args: []string{"change", "campaign", "list"}, stdout: "list"},
		{name: "campaign list json", args: []string{"change", "campaign", "list", "-o", "json"}, stdout: `"campaigns"`, jsonOut: true},
		{name: "campaign status unknown", args: []string{"change", "campaign", "status", "0123456789abcdef"}, code: exitNotFound},
		{name: "campaign status bad id", args: []string{"change", "campaign", "status", "xyz"}, code: exitUsage},
		{name: "campaign cancel unknown", args: []string{"change", "campaign", "cancel", "0123456789abcdef"}, code: exitNotFound},
		{name: "import bad header", args: []string{"terminal", "import", "-"}, stdin: "serial\nx\n", code: exitUsage},
		{name: "import missing file", args: []string{"terminal", "import", "/nonexistent.csv"}, code: exitUsage},
		{name: "sessions", args: []string{"session", "list"}, stdout: "CLIENT ID"},
		{name: "sessions json", args: []string{"session", "list", "-o", "json"}, stdout: `"sessions": []`, jsonOut: true},
		{name: "disconnect unknown", args: []string{"session", "disconnect", "nobody"}, code: exitNotFound},
		{name: "app add", args: []string{"app", "add", "dash"}, stdout: "(generated; shown once)"},
		{name: "app list", args: []string{"app", "list"}, stdout: "dash"},
		{name: "app list json", args: []string{"app", "list", "-o", "json"}, stdout: `"apps"`, jsonOut: true},
		{name: "app remove", args: []string{"app", "remove", "dash"}, stdout: "removed"},
		{name: "app remove again", args: []string{"app", "remove", "dash"}, code: exitNotFound},
		{name: "wrong token", args: []string{"--token", "wrong-token-0123456789", "app", "list"}, code: exitUnauthorize, stderr: "the admin token of --token"},
		{name: "wrong token file", args: []string{"--token-file", wrongTokenFile, "app", "list"}, code: exitUnauthorize, stderr: "the admin token of token file " + wrongTokenFile},
		{name: "no token file", args: []string{"--token-file", "/nonexistent", "app", "list"}, code: exitUsage, stderr: "no admin token"},
		{name: "empty token file", args: []string{"--token-file", emptyTokenFile, "app", "list"}, code: exitUsage, stderr: "token file " + emptyTokenFile + " is empty"},
		{name: "error as json", args: []string{"terminal", "get", "T9", "-o", "json"}, code: exitNotFound, stderr: `"status": 404`},
		{name: "unreachable", args: []string{"--server", "http://127.0.0.1:1", "--token", "some-token-0123456789", "app", "list"}, code: exitUnavailable},
		{name: "not m2mguard", args: []string{"--server", htmlServer.URL, "--token", "some-token-0123456789", "terminal", "list"}, code: exitUnavailable,
			stderr: htmlServer.URL + " is not an m2mguard admin API: got text/html (HTTP 404)"},
		{name: "bad output", args: []string{"app", "list", "-o", "yaml"}, code: exitUsage},
		{name: "unknown command", args: []string{"terminal", "frobnicate"}, code: exitUsage},
		{name: "group alone", args: []string{"terminal"}, code: exitUsage},
		{name: "help", args: []string{"terminal", "add", "--help"}, stdout: "prints secrets, by design"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if !strings.HasPrefix(args[0], "--server") {
				args = append(append([]string{}, g...), args...)
			}
			code, out, errs := ctl(t, tc.stdin, args...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out, errs)
			}
			if !strings.Contains(out, tc.stdout) {
				t.Errorf("stdout lacks %q:\n%s", tc.stdout, out)
			}
			if !strings.Contains(errs, tc.stderr) {
				t.Errorf("stderr lacks %q:\n%s", tc.stderr, errs)
			}
			if tc.notOut != "" && strings.Contains(out, tc.notOut) {
				t.Errorf("stdout contains %q:\n%s", tc.notOut, out)
			}
			if tc.jsonOut && !json.Valid([]byte(out)) {
				t.Errorf("stdout is not JSON:\n%s", out)
			}
			for _, internal := range []string{"keysvc", "boltstore", "<html", "<!DOCTYPE"} {
				if strings.Contains(errs, internal) {
					t.Errorf("stderr shows %q:\n%s", internal, errs)
				}
			}
			if slices.Contains(args, "json") && code != exitOK && !json.Valid([]byte(errs)) {
				t.Errorf("-o json: stderr is not JSON:\n%s", errs)
			}
		})
	}

	// The credential file written by terminal add is one m2m-terminal and
	// the client library load.
	rec, err := client.NewFileStore(creds).Load()
	if err != nil {
		t.Fatal(err)
	}
	if rec.Identity.SN != "T1" || len(rec.Current.BK) != 32 || len(rec.Current.Up) != 16 {
		t.Fatalf("credential file: %+v", rec.Identity)
	}
	if !strings.HasPrefix(rec.BrokerURL, "tcp://127.0.0.1:") {
		t.Fatalf("credential file: broker URL %q, want the bundle's (m2m-terminal dials it without --broker)", rec.BrokerURL)
	}
	if fi, _ := os.Stat(creds); fi.Mode().Perm() != 0o600 {
		t.Errorf("credential file mode %v", fi.Mode().Perm())
	}
	// It is not overwritten.
	code, _, errs := ctl(t, "", append(g, "terminal", "add", "--sn", "T5", "--imei", "354494040518575", "--imsi", "460020084678125", "--creds", creds)...)
	if code != exitUsage || !strings.Contains(errs, "exists") {
		t.Fatalf("exit %d: %s", code, errs)
	}
}

// TestLinksNeitherMochiNorPrometheus: the operator's CLI links the admin
// API's client, not the broker: neither mochi-mqtt nor Prometheus.
func TestLinksNeitherMochiNorPrometheus(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go is not on PATH")
	}
	out, err := exec.Command(goBin, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for dep := range strings.Lines(string(out)) {
		if strings.Contains(dep, "mochi-mqtt") || strings.Contains(dep, "prometheus") {
			t.Errorf("m2mctl links %s", strings.TrimSpace(dep))
		}
	}
}

// TestOperationsCommands: reports, last seen, import --creds-out, whoami,
// a read-only operator's token and token new.
func TestOperationsCommands(t *testing.T) {
	const viewer = "viewer-token-0123456789abcdef"
	dir := t.TempDir()
	tokens := filepath.Join(dir, "operators")
	os.WriteFile(tokens, []byte(adminapi.OperatorLine("viewer", adminapi.RoleRead, viewer)+"\n"), 0o600)
	cfg := broker.Default()
	cfg.DataDir = filepath.Join(dir, "data")
	cfg.MQTT.TCP, cfg.MQTT.WS, cfg.Admin.Listen = "127.0.0.1:0", "", "127.0.0.1:0"
	cfg.Admin.TokensFile = tokens
	b, err := broker.Start(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	g := []string{"--server", "http://" + b.Addr("admin"), "--token-file", filepath.Join(cfg.DataDir, "admin.token")}
	credsOut := filepath.Join(dir, "creds.csv")
	emptyOut := filepath.Join(dir, "none.csv")
	const fleet = "sn,imei,imsi\nR1,354494040518570,460020084678120\nR2,354494040518571,460020084678121\nR3,354494040518572,460020084678122\n"
	for _, tc := range []struct {
		name, stdin, stdout, stderr string
		args                        []string
		code                        int
		json                        bool
	}{
		{name: "import creds", args: []string{"terminal", "import", "-", "--creds-out", credsOut}, stdin: fleet,
			stdout: "rows 3, created 3, rejected 0", stderr: "credentials of 3 terminals written to " + credsOut + " (mode 0600)"},
		{name: "creds file exists", args: []string{"terminal", "import", "-", "--creds-out", credsOut}, stdin: fleet, code: exitUsage, stderr: "file exists"},
		{name: "no terminal stored, no file", args: []string{"terminal", "import", "-", "--creds-out", emptyOut}, stdin: fleet, code: exitFailure, stdout: "rejected 3"},
		{name: "never seen in get", args: []string{"terminal", "get", "R1"}, stdout: "last seen           never"},
		{name: "report never-seen table", args: []string{"report", "never-seen", "--progress", "always"}, stdout: "R3", stderr: "scanned 3 terminals, 2 in the report"},
		{name: "report csv", args: []string{"report", "not-seen", "--since", "2025-03-01", "-o", "csv"},
			stdout: "sn,status,upexp,downexp,bkexp,expiring,last_seen,remote,protocol,session_key\nR1,active,never,never,never,,,,,\nR2,active,never,never,never,,2025-02-01T00:00:00Z,192.0.2.1:1000,5,true\nR3,"},
		{name: "report json", args: []string{"report", "never-seen", "-o", "json"}, stdout: `"sn":"R3"`, json: true},
		{name: "report json empty", args: []string{"report", "expiring", "--before", "2030-01-01", "-o", "json"}, stdout: "[]\n", json: true},
		{name: "expiring needs --before", args: []string{"report", "expiring"}, code: exitUsage, stderr: "--before is required"},
		{name: "bad date", args: []string{"report", "not-seen", "--since", "March"}, code: exitUsage, stderr: "--since: want a date"},
		{name: "csv only for reports", args: []string{"app", "list", "-o", "csv"}, code: exitUsage, stderr: "only for reports"},
		{name: "whoami", args: []string{"whoami"}, stdout: "operator admin (role full)"},
		{name: "whoami viewer", args: []string{"--token", viewer, "whoami", "-o", "json"}, stdout: `"role": "read"`, json: true},
		{name: "viewer may not disable", args: []string{"--token", viewer, "terminal", "disable", "R1"}, code: exitUnauthorize, stderr: "operator viewer may only read (role read) (HTTP 403)"},
		{name: "viewer reports", args: []string{"--token", viewer, "report", "never-seen", "-o", "csv"}, stdout: "R1,active"},
		{name: "token new", args: []string{"token", "new", "--name", "bob", "--role", "read"}, stdout: "bob read sha256:"},
		{name: "token new admin", args: []string{"token", "new", "--name", "admin"}, code: exitUsage},
		{name: "token new role", args: []string{"token", "new", "--name", "bob", "--role", "root"}, code: exitUsage},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "never seen in get" { // R2's login, recorded as the hook records it
				b.LastSeen().Seen("R2", lastseen.Entry{At: time.Date(2025, 2, 1, 0, 0, 0, 0, time.UTC), Remote: "192.0.2.1:1000", Protocol: 5, SessionKey: true})
			}
			code, out, errs := ctl(t, tc.stdin, append(append([]string{}, g...), tc.args...)...)
			if code != tc.code || !strings.Contains(out, tc.stdout) || !strings.Contains(errs, tc.stderr) {
				t.Fatalf("exit %d (want %d)\nstdout: %s\nstderr: %s", code, tc.code, out, errs)
			}
			if tc.json && !json.Valid([]byte(out)) {
				t.Fatalf("stdout is not JSON:\n%s", out)
			}
		})
	}
	if fi, err := os.Stat(credsOut); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("creds file: %v %v", fi, err)
	}
	if _, err := os.Stat(emptyOut); !os.IsNotExist(err) {
		t.Fatalf("a creds file without a terminal stays: %v", err)
	}
	data, _ := os.ReadFile(credsOut)
	if lines := strings.Split(strings.TrimSpace(string(data)), "\n"); len(lines) != 4 || !strings.HasPrefix(lines[1], "R1,354494040518570,460020084678120,,hs256,false,") {
		t.Fatalf("creds file:\n%s", data)
	}
	code, out, _ := ctl(t, "", append(g, "terminal", "get", "R2")...)
	if code != 0 || !strings.Contains(out, "2025-02-01T00:00:00Z from 192.0.2.1:1000, MQTT 5, session key") {
		t.Fatalf("get R2: %d\n%s", code, out)
	}
}

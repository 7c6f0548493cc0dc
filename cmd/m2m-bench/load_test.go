package main

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"

	paho "github.com/eclipse/paho.mqtt.golang"
)

const testAppPassword = "bench-test-app-password"

// testBroker provisions terminals into a fresh embedded store (hook mode)
// and starts an in-process broker.
func testBroker(t testing.TB, mode string, terms []*Terminal) *Broker {
	t.Helper()
	b, err := startLocalBroker(context.Background(), t.TempDir(), mode, terms, testAppPassword)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// TestRunLoad drives a few clients of every kind through a connect storm and
// a short publish load. It checks counts, never times.
func TestRunLoad(t *testing.T) {
	t.Parallel()
	terms := genTerminals(4)
	tests := []struct {
		name, mode, kind string
		sessionKey       bool
		publish          bool
	}{
		{"allow-all, bare paho", "allow", "plain", false, true},
		{"hook, reference client, session key", "hook", "terminal", true, true},
		{"hook, reference client, plaintext", "hook", "terminal", false, true},
		{"hook, bare paho, M2M1 login and key", "hook", "m2m1", true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := testBroker(t, tt.mode, terms)
			cfg := LoadConfig{Addr: b.Addr, Kind: tt.kind, SessionKey: tt.sessionKey, Terminals: terms, N: len(terms),
				Concurrency: 2, RTTSamples: 2, Publishers: 2, QoS: 1, PayloadSize: 32}
			if tt.publish {
				cfg.Duration = 300 * time.Millisecond
			}
			if tt.mode == "hook" {
				cfg.AppUser, cfg.AppPassword = appName, testAppPassword
			}
			var mem MemReport
			var before bool
			cfg.BeforeStorm = func() { before = true }
			cfg.AfterConnect = func() { mem = b.Mem() }
			res, err := RunLoad(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if res.Connect.Connected != len(terms) || res.Connect.Failed != 0 || res.RTT.N != 2 {
				t.Fatalf("connected %d, failed %d, rtt samples %d; errors: %v", res.Connect.Connected, res.Connect.Failed, res.RTT.N, res.Errors)
			}
			if !before || res.Connect.ClientCPUPerConn <= 0 {
				t.Errorf("BeforeStorm ran: %v; client CPU per connect %v µs, want > 0", before, res.Connect.ClientCPUPerConn)
			}
			if mem.Clients < len(terms) {
				t.Errorf("broker saw %d clients after the storm, want >= %d", mem.Clients, len(terms))
			}
			if tt.publish {
				if res.Publish == nil || res.Publish.Sent == 0 || res.Publish.Received == 0 || res.Publish.EndToEnd.N == 0 {
					t.Fatalf("publish: %+v; errors: %v", res.Publish, res.Errors)
				}
			} else if res.Publish != nil {
				t.Errorf("publish phase ran without a duration")
			}
		})
	}
}

func TestRunLoadRefusesBadConfig(t *testing.T) {
	terms := genTerminals(1)
	for _, cfg := range []LoadConfig{
		{Kind: "plain", Terminals: terms, N: 2},
		{Kind: "bogus", Terminals: terms, N: 1},
	} {
		if _, err := RunLoad(context.Background(), cfg); err == nil {
			t.Errorf("RunLoad(%+v) accepted", cfg)
		}
	}
}

// BenchmarkACLCheck measures hook.OnACLCheck on a connected terminal and
// a connected application (it runs on every PUBLISH and again for every
// recipient) and fails if it allocates.
func BenchmarkACLCheck(b *testing.B) {
	terms := genTerminals(1)
	br := testBroker(b, "hook", terms)
	ctx := context.Background()
	conn, err := connectTerminal(ctx, br.Addr, terms[0], true)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.close()
	app, err := connectApp(ctx, br.Addr)
	if err != nil {
		b.Fatal(err)
	}
	defer app.Disconnect(0)
	sn := terms[0].ID.SN
	termCl, ok1 := br.Server.Clients.Get(sn)
	appCl, ok2 := br.Server.Clients.Get(appClientID)
	if !ok1 || !ok2 {
		b.Fatal("clients not found on the broker")
	}
	checks := []struct {
		name  string
		cl    any
		topic string
		write bool
	}{
		{"terminal/publish-up", termCl, codec.UpTopic(sn, "data"), true},
		{"terminal/subscribe-down", termCl, codec.DownTopic(sn, "#"), false},
		{"terminal/other-terminal", termCl, codec.UpTopic("OTHER1", "data"), true},
		{"app/deliver-up", appCl, codec.UpTopic(sn, "data"), false},
		{"app/publish-down", appCl, codec.DownTopic(sn, "cmd"), true},
	}
	for _, c := range checks {
		b.Run(c.name, func(b *testing.B) {
			cl := termCl
			if c.cl == appCl {
				cl = appCl
			}
			if a := testing.AllocsPerRun(100, func() { br.Hook.OnACLCheck(cl, c.topic, c.write) }); a != 0 {
				b.Fatalf("OnACLCheck allocates %.0f times", a)
			}
			b.ReportAllocs()
			for b.Loop() {
				br.Hook.OnACLCheck(cl, c.topic, c.write)
			}
		})
	}
}

// appClientID is the ClientID of connectApp's application.
const appClientID = "bench-app-acl"

// connectApp connects the benchmark application (appName) with a bare
// paho client.
func connectApp(ctx context.Context, addr string) (paho.Client, error) {
	pc := paho.NewClient(pahoOptions(addr, appClientID).SetUsername(appName).SetPassword(testAppPassword))
	if err := wait(ctx, pc.Connect()); err != nil {
		return nil, err
	}
	return pc, nil
}

// BenchmarkHookLogin measures the hook's whole handling of an accepted
// CONNECT with a session key (see benchHookLogin).
func BenchmarkHookLogin(b *testing.B) {
	terms := genTerminals(1)
	benchHookLogin(b, testBroker(b, "hook", terms), terms[0])
}

// BenchmarkHookRefusal measures the hook's whole handling of a refused
// terminal CONNECT (see benchHookRefusal), to set against
// BenchmarkHookLogin: a wrong digest and an unknown serial number (each
// from a fresh address, so that the throttle never steps in), and a login
// from an address the throttle refuses.
func BenchmarkHookRefusal(b *testing.B) {
	for _, c := range []struct {
		name string
		kind loginKind
	}{
		{"bad-digest", loginBadDigest},
		{"unknown-sn", loginUnknownSN},
		{"throttled", loginThrottled},
	} {
		b.Run(c.name, func(b *testing.B) {
			terms := genTerminals(1)
			benchHookRefusal(b, testBroker(b, "hook", terms), terms[0], c.kind)
		})
	}
}

// BenchmarkHookLoginReplayGuard is BenchmarkHookLogin with each replay
// guard: the hook's default in memory, and the file guard the broker runs
// (replay.Open: one write(2) per accepted login, fsync every second).
func BenchmarkHookLoginReplayGuard(b *testing.B) {
	for _, guard := range []string{"memory", "file"} {
		b.Run(guard, func(b *testing.B) {
			terms := genTerminals(1)
			dir := b.TempDir()
			br, err := startLocalBroker(context.Background(), dir, "hook", terms, testAppPassword, func(c *BrokerConfig) {
				if guard == "file" {
					c.ReplayDir = filepath.Join(dir, "replay")
				}
			})
			if err != nil {
				b.Fatal(err)
			}
			defer br.Close()
			benchHookLogin(b, br, terms[0])
		})
	}
}

// TestServeCommands drives `serve` as the suite does: the address line,
// then one JSON answer per command on stdin, until stdin closes.
func TestServeCommands(t *testing.T) {
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- cmdServe(context.Background(), []string{"--mode", "allow"}, inR, outW)
		outW.Close()
	}()
	dec := json.NewDecoder(outR)
	var addr map[string]string
	if err := dec.Decode(&addr); err != nil || addr["addr"] == "" {
		t.Fatalf("first line: %v %v", addr, err)
	}
	ask := func(cmd string, v any) {
		t.Helper()
		if _, err := io.WriteString(inW, cmd+"\n"); err != nil {
			t.Fatal(err)
		}
		if err := dec.Decode(v); err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
	}
	var c0, c1 CPUReport
	ask("cpu", &c0)
	var mem MemReport
	ask("mem", &mem) // two full GCs: CPU time moves on
	ask("cpu", &c1)
	if c0.CPUNs <= 0 || c1.CPUNs <= c0.CPUNs {
		t.Errorf("cpu answers %d then %d, want positive and growing", c0.CPUNs, c1.CPUNs)
	}
	var fds struct{ FDs int }
	if ask("fds", &fds); fds.FDs < 3 {
		t.Errorf("fds answered %d, want >= 3 (stdin, stdout, stderr)", fds.FDs)
	}
	prof := filepath.Join(t.TempDir(), "storm.pprof")
	var ok map[string]any
	for _, cmd := range []string{"profile-start " + prof, "profile-stop", "profile-stop"} {
		if ask(cmd, &ok); ok["ok"] != true {
			t.Errorf("%s answered %v", cmd, ok)
		}
	}
	if fi, err := os.Stat(prof); err != nil || fi.Size() == 0 {
		t.Errorf("no profile written: %v", err)
	}
	var bad map[string]string
	ask("profile-start", &bad)
	if bad["error"] == "" {
		t.Errorf("profile-start without a file answered %v", bad)
	}
	ask("bogus", &bad)
	if !strings.Contains(bad["error"], "unknown command") {
		t.Errorf("unknown command answered %v", bad)
	}
	inW.Close()
	if err := <-done; err != nil {
		t.Fatalf("serve: %v", err)
	}
}

// BenchmarkHookConnection measures the hook's whole share of one storm
// connection (see benchHookConnection).
func BenchmarkHookConnection(b *testing.B) {
	terms := genTerminals(1)
	benchHookConnection(b, testBroker(b, "hook", terms), terms[0])
}

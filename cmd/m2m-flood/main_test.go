package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/stats"
	"github.com/m2mguard/m2mguard/internal/testbin"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

// TestMain runs 4 parallel tests per CPU at a time, not go test's default
// of one: the scenarios of TestSuiteProducesFigures wait for broker
// processes of their own (attack, cool-down, shutdown).
func TestMain(m *testing.M) {
	testwait.SetParallel(4)
	os.Exit(m.Run())
}

// TestSuiteProducesFigures builds the broker, runs every scenario for about
// a second with small numbers and checks that each produced its figures.
// It asserts nothing about the figures themselves: the suite must run
// against the vulnerable broker and the fixed one alike. Each scenario runs
// a broker process of its own, so the scenarios run side by side, one
// m2m-flood run each, on the binary built once.
func TestSuiteProducesFigures(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the broker binary")
	}
	t.Parallel()
	// buildBroker, into testbin's directory: shared with the other test
	// packages that run the broker, relinked only when the code changed.
	var bin string
	if err := testbin.Locked(func(dir string) (err error) {
		bin, err = buildBroker(t.Context(), dir)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// Each scenario's figure that shows the attack took place.
	ran := map[string]string{"app": "attempts", "wedge": "sent", "throttle": "attempts", "ws": "conns", "control": "sent", "phantom": "reset"}
	genuine := map[string]bool{"app": true, "throttle": true}
	if names := scenarioNames(); len(names) != len(ran) {
		t.Fatalf("scenarios %v, want the %d of ran", names, len(ran))
	}
	for _, name := range scenarioNames() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if ran[name] == "" {
				t.Fatalf("scenario %s: no figure to check", name)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
			defer cancel()
			var out, errb bytes.Buffer
			code := run(ctx, []string{"--json", "--broker", bin, "--scenario", name, "--seconds", "1", "--cooldown", "0.5", "--connect-timeout", "1",
				"--app-workers", "4", "--throttle-workers", "2", "--ws-conns", "20", "--ws-grace", "0.5",
				"--phantoms", "20", "--wedge-timeout", "2", "--genuine-interval", "50ms"}, &out, &errb)
			if code != exitOK {
				t.Fatalf("exit %d\n%s", code, errb.String())
			}
			var res struct {
				Results []struct {
					Scenario      string         `json:"scenario"`
					AttackSeconds float64        `json:"attack_seconds"`
					RSS           RSS            `json:"rss"`
					Genuine       *LoginStats    `json:"genuine_during"`
					GenuineAfter  *LoginStats    `json:"genuine_after"`
					Detail        map[string]any `json:"detail"`
					Checks        []Check        `json:"checks"`
					Shutdown      string         `json:"shutdown"`
					Error         string         `json:"error"`
				} `json:"results"`
			}
			if err := json.Unmarshal(out.Bytes(), &res); err != nil {
				t.Fatalf("JSON: %v\n%s", err, out.String())
			}
			if len(res.Results) != 1 || res.Results[0].Scenario != name {
				t.Fatalf("%d results, want the one of %s", len(res.Results), name)
			}
			r := res.Results[0]
			if r.Error != "" || r.Shutdown == "" || r.AttackSeconds <= 0 || len(r.Checks) == 0 {
				t.Fatalf("error %q, shutdown %q, %.1f s, %d checks", r.Error, r.Shutdown, r.AttackSeconds, len(r.Checks))
			}
			if r.RSS.Before <= 0 || r.RSS.End <= 0 || r.RSS.Peak < r.RSS.Before || r.RSS.After == nil {
				t.Errorf("RSS figures missing: %+v", r.RSS)
			}
			if n, _ := r.Detail[ran[r.Scenario]].(float64); n <= 0 {
				t.Errorf("detail %s = %v: %v", ran[r.Scenario], r.Detail[ran[r.Scenario]], r.Detail)
			}
			if genuine[r.Scenario] && (r.Genuine == nil || r.Genuine.Attempts == 0 || r.GenuineAfter == nil || r.GenuineAfter.Attempts == 0) {
				t.Errorf("genuine logins missing: %+v %+v", r.Genuine, r.GenuineAfter)
			}
		})
	}
}

func TestTables(t *testing.T) {
	after := 20.5
	results := []*Result{
		{Scenario: "app", Detail: &appDetail{Workers: 4, Attempts: 9, Outcomes: map[string]int64{"0x86": 8, "closed": 1}},
			Genuine: &LoginStats{Attempts: 3, OK: 2, Failures: map[string]int{"timeout": 1}, Latency: stats.Latency{N: 2, P99: 12}}},
		{Scenario: "wedge", Detail: &wedgeDetail{Sent: 10, Blocked: true, TakeoverCode: "timeout", Takeover: timedCall{MS: 2000, TimedOut: true}}},
		{Scenario: "throttle", Detail: &throttleDetail{Attempts: 100, Refusals: 100, Ratio: 0.9, FirstRate: 10, LastRate: 9, Window: 5}},
		{Scenario: "ws", Detail: &wsDetail{Conns: 20, Accepted: 20, OpenAtCheck: 20, CheckedAfter: 2}},
		{Scenario: "control", Detail: &controlDetail{Sent: 1000, Closed: true, ClosedAfter: 0.2, Disconnect: "0x83"}},
		{Scenario: "phantom", Detail: &phantomDetail{Attempts: 20, Reset: 20, Sessions: 3, Phantoms: 3}},
	}
	want := map[string][]string{
		"app":      {"0x86 bad user name or password: 8", "2 of 3 ok", "timeout 1", "target NOT MET"},
		"wedge":    {"the broker stopped reading", "no answer after 2000 ms", "target NOT MET"},
		"throttle": {"last/first 0.900", "target met"},
		"ws":       {"20 still open", "none closed", "target NOT MET"},
		"control":  {"DISCONNECT 0x83", "RSS growth"},
		"phantom":  {"3, of them 3 of the reset logins", "target NOT MET"},
	}
	for _, r := range results {
		r.RSS = RSS{Before: 10, End: 30, Peak: 40, After: &after}
		r.Checks = r.Detail.checks(r)
		var b bytes.Buffer
		writeTable(&b, r)
		for _, s := range append(want[r.Scenario], "== "+r.Scenario, "peak 40.0 MiB (growth 30.0 MiB)", "idle 20.5 MiB") {
			if !strings.Contains(b.String(), s) {
				t.Errorf("%s table lacks %q:\n%s", r.Scenario, s, b.String())
			}
		}
	}
}

func TestParseFlags(t *testing.T) {
	c, err := parseFlags([]string{"--seconds", "1.5", "--cooldown", "2m", "--scenario", "ws, phantom", "--broker-flag=--log-level=warn", "--broker-flag=--a=b"}, new(bytes.Buffer))
	if err != nil {
		t.Fatal(err)
	}
	if c.Seconds != 1500*time.Millisecond || c.Cooldown != 2*time.Minute || strings.Join(c.Scenarios, ",") != "ws,phantom" ||
		strings.Join(c.BrokerFlags, " ") != "--log-level=warn --a=b" || c.AppWorkers != 256 || c.WSConns != 2000 {
		t.Fatalf("%+v", c)
	}
	for _, bad := range [][]string{
		{"--scenario", "nope"}, {"--scenario", ","}, {"--seconds", "x"}, {"--seconds", "0"},
		{"--app-workers", "0"}, {"--failures", "-1"}, {"extra"},
	} {
		if _, err := parseFlags(bad, new(bytes.Buffer)); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
	var out, errb bytes.Buffer
	if code := run(t.Context(), []string{"--scenario", "nope"}, &out, &errb); code != exitUsage {
		t.Errorf("bad scenario: exit %d", code)
	}
	if code := run(t.Context(), []string{"-h"}, &out, &errb); code != exitOK || !strings.Contains(errb.String(), "Scenarios: app, wedge") {
		t.Errorf("-h: exit %d\n%s", code, errb.String())
	}
}

func TestWindowRates(t *testing.T) {
	tests := []struct {
		name               string
		counts             []int64
		want               time.Duration
		window, first, ast float64
	}{
		{"empty", nil, 5 * time.Second, 0, 0, 0},
		{"one bucket", []int64{3}, 5 * time.Second, 0, 0, 0},
		{"half the timeline when short", []int64{1, 1, 2, 2}, 5 * time.Second, 0.2, 10, 20},
		{"the wanted window", []int64{5, 5, 1, 1, 1, 1, 3, 3}, 200 * time.Millisecond, 0.2, 50, 30},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w, f, l := windowRates(tt.counts, 100*time.Millisecond, tt.want)
			if w != tt.window || f != tt.first || l != tt.ast {
				t.Errorf("windowRates = %v %v %v, want %v %v %v", w, f, l, tt.window, tt.first, tt.ast)
			}
		})
	}
}

func TestRefusal(t *testing.T) {
	for outcome, want := range map[string]bool{"0x00": false, "0x86": true, "0x8a": true, "0x89": true, "closed": true,
		"timeout": false, "dial": false, "error": false, "0x7f": false} {
		if refusal(outcome) != want {
			t.Errorf("refusal(%q) = %v", outcome, !want)
		}
	}
}

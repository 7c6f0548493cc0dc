package main

import (
	"bytes"
	"encoding/json"
	"math"
	"testing"

	"github.com/m2mguard/m2mguard/internal/stats"
)

func TestRatiosRoundByRound(t *testing.T) {
	mk := func(round int, sc string, cps, mps, heap float64) RoundResult {
		return RoundResult{Scenario: sc, Round: round, HeapPerCon: heap,
			Load: &LoadResult{Connect: ConnectResult{PerSec: cps}, Publish: &PublishResult{PerSec: mps}}}
	}
	cpu := func(r RoundResult, us float64) RoundResult { r.BrokerCPUPerConn = us; return r }
	rounds := []RoundResult{
		cpu(mk(1, "bolt-m2m1", 900, 0, 110), 250), cpu(mk(2, "bolt-m2m1", 900, 0, 110), 105),
		mk(1, "allow", 1000, 0, 100), mk(1, "bolt", 950, 800, 110), mk(1, "bolt-plain", 990, 1000, 105),
		mk(2, "allow", 2000, 0, 100), mk(2, "bolt", 1600, 900, 130), mk(2, "bolt-plain", 1900, 1000, 105),
		mk(3, "allow", 1000, 0, 100), mk(3, "bolt", 920, 700, 115), mk(3, "bolt-plain", 980, 1000, 105),
	}
	rounds[2].BrokerCPUPerConn, rounds[5].BrokerCPUPerConn = 200, 100 // allow, rounds 1 and 2; round 3 has no bolt-m2m1
	got := map[string]Ratio{}
	for _, r := range ratios(rounds, 3) {
		got[r.Name] = r
	}
	tests := []struct {
		name string
		want float64
		met  bool
	}{
		{"connect rate, reference client on the hook, bolt (session key) / bare paho on allow-all", 0.92, true},
		{"publish throughput end to end, encrypted / plaintext (same hook broker)", 0.8, true},
		{"heap per connected terminal, hook on bolt / allow-all", 1.15, true},
	}
	// capacity = 1/CPU per connect: 200/250 = 0.8 and 100/105 ≈ 0.952, median of two is their mean.
	if r := got["broker capacity, same bare paho client (connects per broker CPU-second in the storm): hook on bolt, M2M1 login + session key / allow-all"]; math.Abs(r.Value-(0.8+100.0/105)/2) > 1e-9 || len(r.Rounds) != 2 || r.Met {
		t.Errorf("capacity ratio %+v, want %v from 2 rounds, not met", r, (0.8+100.0/105)/2)
	}
	for _, tt := range tests {
		r, ok := got[tt.name]
		if !ok {
			t.Fatalf("no ratio %q", tt.name)
		}
		if math.Abs(r.Value-tt.want) > 1e-9 || r.Met != tt.met || len(r.Rounds) != 3 {
			t.Errorf("%s = %v (met %v, rounds %v), want %v (met %v)", tt.name, r.Value, r.Met, r.Rounds, tt.want, tt.met)
		}
	}
	if _, ok := got["connect rate, reference client on the hook, Vault warm (session key) / bare paho on allow-all"]; ok {
		t.Error("a ratio without its scenario was reported")
	}
}

func TestLoadResultJSON(t *testing.T) {
	r := LoadResult{Kind: "terminal", SessionKey: true, Addr: "127.0.0.1:1883", N: 2,
		Connect: ConnectResult{Attempted: 2, Connected: 2, Seconds: 0.5, PerSec: 4, Latency: stats.Latency{N: 2, P50: 1.5}},
		Publish: &PublishResult{Publishers: 1, QoS: 1, PayloadBytes: 64, Sent: 10, Received: 9, PerSec: 18}}
	data, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"connects_per_sec":4`, `"p50_ms":1.5`, `"received_per_sec":18`, `"session_key":true`, `"connect_rtt"`} {
		if !bytes.Contains(data, []byte(key)) {
			t.Errorf("JSON lacks %s: %s", key, data)
		}
	}
	var back LoadResult
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatal(err)
	}
	if back.Connect != r.Connect || *back.Publish != *r.Publish {
		t.Errorf("round trip: %+v, want %+v", back, r)
	}
}

func TestTerminalsCSVRoundTrip(t *testing.T) {
	ts := genTerminals(3)
	var buf bytes.Buffer
	if err := writeTerminals(&buf, ts); err != nil {
		t.Fatal(err)
	}
	back, err := readTerminals(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if len(back) != 3 {
		t.Fatalf("%d terminals read", len(back))
	}
	for i := range ts {
		if back[i].ID != ts[i].ID || !bytes.Equal(back[i].Up, ts[i].Up) || !bytes.Equal(back[i].Down, ts[i].Down) || !bytes.Equal(back[i].BK, ts[i].BK) {
			t.Errorf("terminal %d differs after the round trip", i)
		}
	}
	for _, bad := range []string{"", "sn,imei\n", csvHeader + "\nS1,356938035643809,460001234567890,,hs256,aaaaaaaaaaaaaaaa,bbbbbbbbbbbbbbbb,zz\n"} {
		if _, err := readTerminals(bytes.NewBufferString(bad)); err == nil {
			t.Errorf("readTerminals(%q) accepted", bad)
		}
	}
}

// TestRatioTargets: the capacity targets are 0.92 with a session key and
// 0.95 without, on bolt and on Vault; each refusal path is held to 0.85
// of the accept path, by rate and by capacity.
func TestRatioTargets(t *testing.T) {
	mk := func(sc string, cps, cpuUs float64) RoundResult {
		return RoundResult{Scenario: sc, Round: 1, BrokerCPUPerConn: cpuUs, Load: &LoadResult{Connect: ConnectResult{PerSec: cps}}}
	}
	rounds := []RoundResult{
		mk("allow", 1000, 100),
		mk("bolt-m2m1", 900, 100/0.93), mk("vault-m2m1", 900, 100/0.91),
		mk("bolt-m2m1-nokey", 900, 100/0.96), mk("vault-m2m1-nokey", 900, 100/0.94),
		mk("accept-connack", 2000, 100),
		mk("refuse-digest", 1720, 100/0.86), mk("refuse-unknown", 1680, 100/0.9), mk("refuse-throttled", 2400, 100/0.84),
	}
	got := map[string]Ratio{}
	for _, r := range ratios(rounds, 1) {
		got[r.Name] = r
	}
	tests := []struct {
		name   string
		want   float64
		target string
		met    bool
	}{
		{"broker capacity, same bare paho client (connects per broker CPU-second in the storm): hook on bolt, M2M1 login + session key / allow-all", 0.93, ">= 0.92", true},
		{"broker capacity, same bare paho client: hook on Vault, warm cache, M2M1 login + session key / allow-all", 0.91, ">= 0.92", false},
		{"broker capacity, same bare paho client: hook on bolt, M2M1 login without session key / allow-all", 0.96, ">= 0.95", true},
		{"broker capacity, same bare paho client: hook on Vault, warm cache, M2M1 login without session key / allow-all", 0.94, ">= 0.95", false},
		{"refusal, wrong digest / accept (accept-connack), attempts answered per second", 0.86, ">= 0.85", true},
		{"refusal, unknown sn / accept, attempts answered per second", 0.84, ">= 0.85", false},
		{"refusal, throttled / accept, attempts answered per second", 1.2, ">= 0.85", true},
		{"refusal, wrong digest / accept, broker capacity (attempts answered per broker CPU-second)", 0.86, ">= 0.85", true},
		{"refusal, unknown sn / accept, broker capacity", 0.9, ">= 0.85", true},
		{"refusal, throttled / accept, broker capacity", 0.84, ">= 0.85", false},
	}
	for _, tt := range tests {
		r, ok := got[tt.name]
		if !ok {
			t.Errorf("no ratio %q", tt.name)
			continue
		}
		if math.Abs(r.Value-tt.want) > 1e-9 || r.Met != tt.met || r.Target != tt.target {
			t.Errorf("%s = %v (met %v, target %s), want %v (met %v, target %s)", tt.name, r.Value, r.Met, r.Target, tt.want, tt.met, tt.target)
		}
	}
}

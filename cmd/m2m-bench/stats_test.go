package main

import (
	"bytes"
	"encoding/json"
	"math"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	ds := func(ms ...int) []time.Duration {
		out := make([]time.Duration, len(ms))
		for i, m := range ms {
			out[i] = time.Duration(m) * time.Millisecond
		}
		return out
	}
	hundred := make([]int, 100)
	for i := range hundred {
		hundred[i] = i + 1
	}
	tests := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 50, 0},
		{"one", ds(7), 99, 7 * time.Millisecond},
		{"p50 of 1..100", ds(hundred...), 50, 50 * time.Millisecond},
		{"p95 of 1..100", ds(hundred...), 95, 95 * time.Millisecond},
		{"p99 of 1..100", ds(hundred...), 99, 99 * time.Millisecond},
		{"p100 of 1..100", ds(hundred...), 100, 100 * time.Millisecond},
		{"p50 of 4 (nearest rank)", ds(1, 2, 3, 4), 50, 2 * time.Millisecond},
		{"p99 of 4", ds(1, 2, 3, 4), 99, 4 * time.Millisecond},
		{"tiny p rounds up to the first", ds(1, 2, 3), 0.001, time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := percentile(tt.sorted, tt.p); got != tt.want {
				t.Errorf("percentile(%v, %v) = %v, want %v", tt.sorted, tt.p, got, tt.want)
			}
		})
	}
}

func TestSummarize(t *testing.T) {
	got := summarize([]time.Duration{3 * time.Millisecond, time.Millisecond, 2 * time.Millisecond})
	want := Latency{N: 3, P50: 2, P95: 3, P99: 3, Max: 3, Mean: 2}
	if got != want {
		t.Errorf("summarize = %+v, want %+v", got, want)
	}
	if (summarize(nil) != Latency{}) {
		t.Error("summarize(nil) is not zero")
	}
}

func TestMedianAndRatio(t *testing.T) {
	tests := []struct {
		xs   []float64
		want float64
	}{
		{[]float64{5}, 5},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
	}
	for _, tt := range tests {
		in := append([]float64(nil), tt.xs...)
		if got := median(tt.xs); got != tt.want {
			t.Errorf("median(%v) = %v, want %v", tt.xs, got, tt.want)
		}
		for i := range in {
			if in[i] != tt.xs[i] {
				t.Errorf("median modified its input")
			}
		}
	}
	if median(nil) != 0 || ratio(1, 0) != 0 || ratio(1, 4) != 0.25 {
		t.Error("median(nil) or ratio wrong")
	}
}

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
	if r := got["broker capacity, same bare paho client (connects per broker CPU-second in the storm): hook on bolt / allow-all"]; math.Abs(r.Value-(0.8+100.0/105)/2) > 1e-9 || len(r.Rounds) != 2 || r.Met {
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
		Connect: ConnectResult{Attempted: 2, Connected: 2, Seconds: 0.5, PerSec: 4, Latency: Latency{N: 2, P50: 1.5}},
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

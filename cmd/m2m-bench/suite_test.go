package main

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestSuiteRefusals runs the suite small on the accept path and the three
// refusal paths, each broker a child process as in the tool. Every attempt
// must be answered as its scenario requires, by the hook's own count of
// the storm's logins: accepted for accept-connack, refused for bad-digest,
// unknown-terminal and throttled, nothing else. It checks counts, never
// times.
func TestSuiteRefusals(t *testing.T) {
	t.Parallel()
	const n = 50
	s := SuiteSettings{N: n, Rounds: 1, Concurrency: 8, RTTSamples: 5, Publishers: 1, QoS: 1, Payload: 64,
		WritesPending: 256, NetBuf: 2048, GOGC: "100", GOMEMLIMIT: "off", Duration: "0s"}
	want := map[string]string{
		"accept-connack":   "accepted",
		"refuse-digest":    "refused/bad-digest",
		"refuse-unknown":   "refused/unknown-terminal",
		"refuse-throttled": "refused/throttled",
	}
	for _, sc := range allScenarios {
		if _, ok := want[sc.Name]; ok {
			s.Scenarios = append(s.Scenarios, sc)
		}
	}
	if len(s.Scenarios) != len(want) {
		t.Fatalf("%d of the scenarios found", len(s.Scenarios))
	}
	res := &SuiteResult{Command: "test", Started: time.Now().UTC(), Machine: machine(), Settings: s}
	if err := runSuite(t.Context(), res, 0); err != nil {
		t.Fatal(err)
	}
	if len(res.Rounds) != len(want) {
		t.Fatalf("%d round results, want %d", len(res.Rounds), len(want))
	}
	for _, r := range res.Rounds {
		c := r.Load.Connect
		if c.Attempted != n || c.Connected != n || c.Failed != 0 || c.Latency.N != n || r.Load.RTT.N != s.RTTSamples {
			t.Errorf("%s: %+v, RTT samples %d; errors %v", r.Scenario, c, r.Load.RTT.N, r.Load.Errors)
		}
		if len(r.Logins) != 1 || r.Logins[want[r.Scenario]] != n {
			t.Errorf("%s: the storm's logins %v, want %s %d and nothing else", r.Scenario, r.Logins, want[r.Scenario], n)
		}
		if r.BrokerCPUPerConn <= 0 || r.HeapPerCon != 0 || r.Load.Publish != nil {
			t.Errorf("%s: broker CPU %v µs per attempt, heap per conn %v, publish %+v", r.Scenario, r.BrokerCPUPerConn, r.HeapPerCon, r.Load.Publish)
		}
	}
	ratios := 0
	for _, q := range res.Ratios {
		if strings.HasPrefix(q.Name, "refusal, ") {
			ratios++
			if q.Value <= 0 || len(q.Rounds) != 1 || (q.Target != ">= 0.85") != strings.Contains(q.Name, "/ wrong digest") {
				t.Errorf("ratio %+v", q)
			}
		}
	}
	if ratios != 7 {
		t.Errorf("%d refusal ratios, want 7: %+v", ratios, res.Ratios)
	}
	md := renderMarkdown(res)
	for _, s := range []string{"| refuse-throttled | ", "refusal, unknown sn / accept, broker capacity", "— | — (nobody stays connected)"} {
		if !strings.Contains(md, s) {
			t.Errorf("BENCHMARKS.md section lacks %q:\n%s", s, md)
		}
	}
}

// TestCheckLogins: a storm whose logins were answered otherwise than its
// kind requires is an error (errWrongOutcome), so that a refusal scenario
// cannot pass on accepted logins or on refusals for another reason.
func TestCheckLogins(t *testing.T) {
	c := ConnectResult{Attempted: 10, Connected: 10}
	tests := []struct {
		name   string
		kind   string
		c      ConnectResult
		logins map[string]float64
		ok     bool
	}{
		{"accepted", "accept-connack", c, map[string]float64{"accepted": 10}, true},
		{"digest", "refuse-digest", c, map[string]float64{"refused/bad-digest": 10}, true},
		{"throttled", "refuse-throttled", c, map[string]float64{"refused/throttled": 10}, true},
		{"a timeout the hook answered", "refuse-unknown", ConnectResult{Attempted: 10, Connected: 9, Failed: 1}, map[string]float64{"refused/unknown-terminal": 10}, true},
		{"accepted instead of refused", "refuse-throttled", c, map[string]float64{"refused/throttled": 9, "accepted": 1}, false},
		{"another reason", "refuse-unknown", c, map[string]float64{"refused/bad-digest": 10}, false},
		{"a throttled digest", "refuse-digest", c, map[string]float64{"refused/bad-digest": 8, "refused/throttled": 2}, false},
		{"refused instead of accepted", "accept-connack", c, map[string]float64{"accepted": 9, "refused/replay": 1}, false},
		{"fewer than answered", "refuse-digest", c, map[string]float64{"refused/bad-digest": 9}, false},
		{"other kinds unchecked", "m2m1", c, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkLogins(tt.kind, tt.c, tt.logins)
			if tt.ok != (err == nil) || (err != nil && !errors.Is(err, errWrongOutcome)) {
				t.Fatalf("checkLogins = %v, want ok %v", err, tt.ok)
			}
		})
	}
}

package main

import (
	"context"
	"testing"

	"github.com/m2mguard/m2mguard/fleet"
)

// TestFleetBrokerTimesClaims: a hook broker in fleet mode (one NATS node
// here) claims every login on the fleet and reports the claims' latencies
// once: the suite's claim figures count what the storm claimed.
func TestFleetBrokerTimesClaims(t *testing.T) {
	node, err := fleet.StartNode(fleet.NodeOptions{Name: "n1", StoreDir: t.TempDir(),
		Users: []fleet.NodeUser{{Name: natsUser, Password: []byte("bench-test-nats-password")}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Shutdown)
	terms := genTerminals(4)
	b, err := startLocalBroker(context.Background(), t.TempDir(), "hook", terms, testAppPassword, func(c *BrokerConfig) {
		c.NATSURLs, c.NATSPassword, c.BrokerID = []string{node.ClientURL()}, "bench-test-nats-password", "bench-test"
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	cfg := LoadConfig{Addr: b.Addr, Kind: "m2m1", SessionKey: true, Terminals: terms, N: len(terms), Concurrency: 2, RTTSamples: 2}
	res, err := RunLoad(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.Connect.Connected != len(terms) || res.RTT.N != 2 {
		t.Fatalf("connected %d, rtt samples %d; errors: %v", res.Connect.Connected, res.RTT.N, res.Errors)
	}
	if got := b.Claims(); got.N != len(terms)+2 || got.P50 <= 0 {
		t.Errorf("claims timed: %+v, want %d", got, len(terms)+2)
	}
	if again := b.Claims(); again.N != 0 {
		t.Errorf("claims reported twice: %d", again.N)
	}
}

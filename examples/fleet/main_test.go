package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/natstest"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
)

// TestMain runs the example's JetStream cluster on natstest's shorter Raft
// timers (its first meta leader within 2 to 4 s, not 4 to 9 s).
func TestMain(m *testing.M) {
	natstest.FastRaft()
	os.Exit(m.Run())
}

// TestFleetExample runs the example as `go run ./examples/fleet` does: a
// terminal provisioned through broker1 logs in on broker2, the list asked
// of broker3 shows it there, and a disable through broker3 ends it.
func TestFleetExample(t *testing.T) {
	if _, err := vaulttest.Binary(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%v (CI=true: Vault tests may not skip)", err)
		}
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out bytes.Buffer
	if err := run(ctx, &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, want := range []string{"logged in on broker2; session key sid", "FLEETDEMO1   terminal on broker2", "the session on broker2 ended", "broker1 refuses", "done"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "warning") {
		t.Errorf("the session list has warnings:\n%s", out.String())
	}
}

package fleettest

import (
	"os"
	"testing"

	"github.com/m2mguard/m2mguard/internal/natstest"
)

// TestMain runs the fleets' JetStream clusters on natstest's shorter Raft
// timers: a fleet's first meta leader, and a new leader after a node's
// loss, within 2 to 4 s instead of 4 to 9 s.
func TestMain(m *testing.M) {
	natstest.FastRaft()
	os.Exit(m.Run())
}

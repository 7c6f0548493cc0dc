package broker_test

import (
	"os"
	"testing"

	"github.com/m2mguard/m2mguard/internal/natstest"
)

// TestMain runs the JetStream clusters of this package's tests
// (TestComposeFleetRoutesFormCluster) on natstest's shorter Raft timers.
func TestMain(m *testing.M) {
	natstest.FastRaft()
	os.Exit(m.Run())
}

package fleet

import (
	"os"
	"testing"

	"github.com/m2mguard/m2mguard/internal/natstest"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

// TestMain runs 2 parallel tests per CPU at a time, not go test's default
// of one: they mostly wait for NATS clusters (elections, restarts,
// cut-offs, expiries). Not more: each test runs a cluster of three NATS
// servers in this process, under the race detector when it is on. The
// clusters elect their Raft leaders on natstest's shorter timers.
func TestMain(m *testing.M) {
	natstest.FastRaft()
	testwait.SetParallel(2)
	os.Exit(m.Run())
}

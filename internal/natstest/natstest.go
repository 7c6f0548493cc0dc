package natstest

import (
	"os"
	"sync"
	"time"
	_ "unsafe" // go:linkname

	_ "github.com/nats-io/nats-server/v2/server" // the variables below
)

//go:linkname minElectionTimeout github.com/nats-io/nats-server/v2/server.minElectionTimeout
var minElectionTimeout time.Duration

//go:linkname maxElectionTimeout github.com/nats-io/nats-server/v2/server.maxElectionTimeout
var maxElectionTimeout time.Duration

//go:linkname hbInterval github.com/nats-io/nats-server/v2/server.hbInterval
var hbInterval time.Duration

//go:linkname lostQuorumInterval github.com/nats-io/nats-server/v2/server.lostQuorumInterval
var lostQuorumInterval time.Duration

//go:linkname lostQuorumCheck github.com/nats-io/nats-server/v2/server.lostQuorumCheck
var lostQuorumCheck time.Duration

// EnvRaft names the variable that, set to "default", keeps nats-server's
// own Raft timers.
const EnvRaft = "M2MGUARD_NATS_RAFT"

var (
	once     sync.Once
	defaults [4]time.Duration // the timers before FastRaft
)

// FastRaft shortens nats-server's Raft timers for this test process,
// unless M2MGUARD_NATS_RAFT is "default". Call it before the first NATS
// server starts (TestMain); later calls do nothing.
func FastRaft() {
	once.Do(func() {
		defaults = [4]time.Duration{hbInterval, minElectionTimeout, maxElectionTimeout, lostQuorumInterval}
		if os.Getenv(EnvRaft) == "default" {
			return
		}
		hbInterval = 100 * time.Millisecond
		minElectionTimeout = 2 * time.Second
		maxElectionTimeout = 4 * time.Second
		lostQuorumInterval = 5 * time.Second
		lostQuorumCheck = 4 * hbInterval
	})
}

// Defaults returns the timers FastRaft found (nats-server's own), zero
// before its first call: heartbeat, election timeout range and lost-quorum
// interval.
func Defaults() (hb, minElection, maxElection, lostQuorum time.Duration) {
	return defaults[0], defaults[1], defaults[2], defaults[3]
}

// Timers returns the Raft timers in force: heartbeat, election timeout
// range and lost-quorum interval.
func Timers() (hb, minElection, maxElection, lostQuorum time.Duration) {
	return hbInterval, minElectionTimeout, maxElectionTimeout, lostQuorumInterval
}

package natstest

import (
	"os"
	"testing"
	"time"
)

// TestFastRaft: the variables reached are nats-server's (their defaults
// before, the test values after).
func TestFastRaft(t *testing.T) {
	hb, minE, maxE, lq := Timers()
	if hb != time.Second || minE != 4*time.Second || maxE != 9*time.Second || lq != 10*time.Second {
		t.Fatalf("nats-server's defaults changed or were not reached: hb %v, election %v-%v, lost quorum %v", hb, minE, maxE, lq)
	}
	FastRaft()
	if os.Getenv(EnvRaft) == "default" {
		t.Skip(EnvRaft + "=default")
	}
	hb, minE, maxE, lq = Timers()
	if hb != 100*time.Millisecond || minE != 2*time.Second || maxE != 4*time.Second || lq != 5*time.Second {
		t.Fatalf("after FastRaft: hb %v, election %v-%v, lost quorum %v", hb, minE, maxE, lq)
	}
}

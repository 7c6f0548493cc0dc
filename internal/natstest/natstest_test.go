package natstest

import (
	"os"
	"testing"
	"time"
)

// TestFastRaft: the variables reached are nats-server's (their defaults
// before FastRaft, the test values after); -count=N safe.
func TestFastRaft(t *testing.T) {
	FastRaft()
	hb, minE, maxE, lq := Defaults()
	if hb != time.Second || minE != 4*time.Second || maxE != 9*time.Second || lq != 10*time.Second {
		t.Fatalf("nats-server's defaults changed or were not reached: hb %v, election %v-%v, lost quorum %v", hb, minE, maxE, lq)
	}
	if os.Getenv(EnvRaft) == "default" {
		if h, mi, ma, l := Timers(); h != hb || mi != minE || ma != maxE || l != lq {
			t.Fatalf("%s=default: the timers changed to %v, %v-%v, %v", EnvRaft, h, mi, ma, l)
		}
		return
	}
	hb, minE, maxE, lq = Timers()
	if hb != 100*time.Millisecond || minE != 2*time.Second || maxE != 4*time.Second || lq != 5*time.Second {
		t.Fatalf("after FastRaft: hb %v, election %v-%v, lost quorum %v", hb, minE, maxE, lq)
	}
}

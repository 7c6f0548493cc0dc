package client_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/hook"
)

// TestQueuedDownlinkBeyondHeldLimit: a terminal away while the platform
// queues more downlink data for its session than the client holds before
// its session key (64 messages) gets all of it when it returns. mochi
// resends a resumed session's messages right after the CONNACK, before the
// terminal has subscribed to its key topic and so before its new key: the
// hook holds them back until the key is written (SPEC §5), so the client
// never has to hold them. Before that, every message past the 64th was
// dropped by the client (held-overflow), acknowledged and lost.
func TestQueuedDownlinkBeyondHeldLimit(t *testing.T) {
	t.Parallel()
	const queued = 200
	e := newPlatformEnv(t, func(o *hook.Options) { o.SessionLifetime = time.Hour })
	term := e.register("HELD0001")
	c1, ev1, _ := e.newClient(term, nil, true)
	connect(t, c1)
	ev1.wait(t, client.EventSessionKey)
	c1.Close() // a DISCONNECT: the persistent session stays, with its subscriptions

	for i := range queued {
		e.publishDown(term.SN, "cmd", fmt.Sprintf("m%03d", i))
	}

	got := make(chan string, queued+16)
	c2, ev2, _ := e.newClient(term, nil, true, func(cfg *client.Config) {
		cfg.OnData = func(sub string, p []byte) { got <- sub + ":" + string(p) }
	})
	connect(t, c2)
	ev2.wait(t, client.EventSessionKey)
	seen := map[string]bool{}
	deadline := time.After(30 * time.Second)
	for len(seen) < queued {
		select {
		case d := <-got:
			seen[d] = true
		case <-deadline:
			t.Fatalf("%d of %d queued downlinks delivered; client drops: %v", len(seen), queued, c2.Dropped())
		}
	}
	for i := range queued {
		if want := fmt.Sprintf("cmd:m%03d", i); !seen[want] {
			t.Fatalf("missing %s", want)
		}
	}
}

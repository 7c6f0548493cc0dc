package hook_test

import (
	"bufio"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
)

// TestThrottleFloodBounded: a flood of failed logins with fresh serial
// numbers (SECURITY.md, attacks tried) keeps the throttle table within its bound
// (the m2mguard_throttle_entries gauge), does not push out the entry of an
// address in a refusal period, and a genuine login still gets in at once.
// Fresh keys with enough failures to be refused themselves are bounded
// too. M2MGUARD_THROTTLE_FLOOD=1000000 runs the documented flood on the
// default table size and logs the refusal rate of each tenth of it and the
// end/start ratio.
func TestThrottleFloodBounded(t *testing.T) {
	const free = 3
	flood, maxEntries := 2000, 256
	documented := false
	if n, err := strconv.Atoi(os.Getenv("M2MGUARD_THROTTLE_FLOOD")); err == nil && n > 0 {
		flood, maxEntries, documented = n, 0, true // 0: the default, 100,000
	}
	if !documented {
		t.Parallel() // the documented run measures rates: alone
	}
	e := newEnv(t, func(o *hook.Options) {
		o.Throttle = hook.ThrottleOptions{Free: free, Base: time.Hour, MaxEntries: maxEntries}
		if documented {
			o.Logger = slog.New(slog.DiscardHandler) // a million refusal events would fill the memory
		}
	})
	if maxEntries == 0 {
		maxEntries = 100_000
	}
	term := e.register("A00MS8011390002S", codec.HS256)
	bad := term
	bad.up = "NotThePassword00"

	// An attacker's guesses at term from 127.0.0.3 put that pair in a
	// refusal period.
	for i := 0; i < free; i++ {
		dialFrom(t, "127.0.0.3", e.addr, term.sn, term.username(), e.login(bad, false))
	}
	if code := dialFrom(t, "127.0.0.3", e.addr, term.sn, term.username(), e.login(term, false)); code != v5Banned {
		t.Fatalf("right password from the throttled address: 0x%02x, want 0x8A", code)
	}

	// The flood: fresh serial numbers from 127.0.0.1, one failure each.
	var next atomic.Int64
	tenth := max(flood/10, 1)
	rates := make([]float64, 0, 10)
	var mu sync.Mutex
	checkBound := func() {
		if n, ok := e.metric("m2mguard_throttle_entries"); !ok || n > float64(maxEntries) {
			t.Fatalf("m2mguard_throttle_entries = %v (exported: %v), want at most %d", n, ok, maxEntries)
		}
	}
	for done := 0; done < flood; done += tenth {
		start := time.Now()
		n := min(tenth, flood-done)
		run(4, n, func() {
			i := next.Add(1)
			fresh := bad
			fresh.sn = fmt.Sprintf("F%09d", i)
			if code := dialFrom(t, "127.0.0.1", e.addr, fresh.sn, fresh.username(), e.login(fresh, false)); code != v5BadCredentials {
				t.Errorf("fresh sn %s: 0x%02x, want 0x86", fresh.sn, code)
			}
		})
		mu.Lock()
		rates = append(rates, float64(n)/time.Since(start).Seconds())
		mu.Unlock()
		checkBound()
	}
	if code := dialFrom(t, "127.0.0.3", e.addr, term.sn, term.username(), e.login(term, false)); code != v5Banned {
		t.Fatalf("after %d fresh one-failure keys the throttled pair got 0x%02x, want 0x8A still", flood, code)
	}

	// Fresh keys that reach a refusal period themselves: still bounded.
	if !documented {
		run(4, maxEntries, func() {
			fresh := bad
			fresh.sn = fmt.Sprintf("B%09d", next.Add(1))
			for j := 0; j < free; j++ {
				dialFrom(t, "127.0.0.1", e.addr, fresh.sn, fresh.username(), e.login(fresh, false))
			}
		})
		checkBound()
	}

	// The genuine terminal, from the flooding address and from another.
	for _, from := range []string{"127.0.0.1", "127.0.0.2"} {
		start := time.Now()
		if code := dialFrom(t, from, e.addr, term.sn, term.username(), e.login(term, false)); code != 0 {
			t.Fatalf("genuine login from %s after the flood: 0x%02x", from, code)
		}
		t.Logf("genuine login from %s after the flood: %v", from, time.Since(start))
	}
	entries, _ := e.metric("m2mguard_throttle_entries")
	ratio := rates[len(rates)-1] / rates[0]
	t.Logf("flood of %d fresh-sn failures: refusals/s per tenth %.0f; end/start %.2f; %v throttle entries (bound %d)",
		flood, rates, ratio, entries, maxEntries)
	if documented && ratio < 0.5 {
		t.Fatalf("refusal rate at the end of the flood %.0f/s, at its start %.0f/s: ratio %.2f", rates[len(rates)-1], rates[0], ratio)
	}
}

// dialFrom sends a CONNECT from a local loopback address and returns the
// CONNACK code, or 0xff if the broker answered none. It never fails the
// test itself, so that workers may call it.
func dialFrom(t *testing.T, local, addr, clientID, username string, password []byte) byte {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return 0xff
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(connectBytes(clientID, username, password)); err != nil {
		return 0xff
	}
	c := &v5Client{t: t, conn: conn, r: bufio.NewReader(conn)}
	ack, err := c.tryRead(10 * time.Second)
	if err != nil || ack.FixedHeader.Type != packets.Connack {
		return 0xff
	}
	return ack.ReasonCode
}

// run calls f n times on workers goroutines.
func run(workers, n int, f func()) {
	var left atomic.Int64
	left.Store(int64(n))
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for left.Add(-1) >= 0 {
				f()
			}
		}()
	}
	wg.Wait()
}

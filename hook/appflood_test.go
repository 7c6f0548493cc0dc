package hook_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
)

// argonMiB is the memory of one application password verification with the
// production argon2id parameters (keysvc.AppHashParams zero values).
const argonMiB = 19

// TestAppLoginFloodBounded (SECURITY.md, attacks tried): every CONNECT with
// a non-serial ClientID and a username ran argon2id (19 MiB), for unknown
// names too, with no bound on how many ran at once, and a fresh name each
// time was never throttled. Workers from two addresses flood application
// logins with fresh names, with the production argon2id parameters, while
// a genuine terminal logs in again and again from a third address.
//
// Asserted: the verifications running at once never exceed the default
// bound (max(1, GOMAXPROCS/2)); their number stays within the default rate
// budget; the heap, at its peak during the flood and after it, grows by less
// than the bound allows (128 MiB at one verification at a time); every
// genuine terminal login succeeds; a genuine application gets in from a
// fresh address once the flood stops. The terminal's login latency is
// reported, not asserted.
//
// M2MGUARD_APPFLOOD_WORKERS (default 32) and M2MGUARD_APPFLOOD_SECONDS
// (default 3) size the run.
func TestAppLoginFloodBounded(t *testing.T) {
	workers := envInt(t, "M2MGUARD_APPFLOOD_WORKERS", 32)
	duration := time.Duration(envInt(t, "M2MGUARD_APPFLOOD_SECONDS", 3)) * time.Second
	var verify *countingRegistry
	e := newEnvWith(t, func(o *keysvc.Options) {
		o.AppHash = keysvc.AppHashParams{} // production costs: 19 MiB, t=2
	}, func(o *hook.Options) {
		verify = &countingRegistry{Registry: o.Registry}
		o.Registry = verify
		o.Apps = hook.AppLimitOptions{} // the production budgets
	})
	term := e.register("A00MS8011390002S", codec.HS256)
	appPassword := e.addApp("dash")

	// The documented defaults of hook.AppLimitOptions.
	concurrency := max(1, runtime.GOMAXPROCS(0)/2)
	rate := 10 * float64(concurrency)
	burst := max(2, 2*rate)

	runtime.GC()
	before := readMem()
	sampler := startHeapSampler()

	var codes codeCounts
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range workers {
		local := "127.0.0.1"
		if w%4 == 3 { // a quarter of the workers from another address
			local = "127.0.0.2"
		}
		wg.Go(func() {
			d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				name := fmt.Sprintf("flood-%d-%d", w, i) // a fresh name every time
				code, _, err := connectV5(d, e.addr, name+"-c", name, []byte("not-the-password"))
				codes.add(code, err)
			}
		})
	}

	// The genuine terminal, from a third address, while the flood runs.
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.3")}}
	var latencies []time.Duration
	var failed []string
	start := time.Now()
	tick := time.NewTicker(25 * time.Millisecond)
	for time.Since(start) < duration {
		<-tick.C
		code, took, err := connectV5(d, e.addr, term.sn, term.username(), e.login(term, false))
		latencies = append(latencies, took)
		if err != nil || code != 0 {
			failed = append(failed, fmt.Sprintf("0x%02x %v", code, err))
		}
	}
	tick.Stop()
	close(stop)
	wg.Wait()
	elapsed := time.Since(start)
	verified := verify.total.Load()
	peak := sampler.stop()

	runtime.GC()
	after := readMem()

	// A genuine application from a fresh address gets in once the flood has
	// stopped (the global rate budget refills).
	appIn := testwait.Until(10*time.Second, func() bool {
		d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.4")}}
		code, _, err := connectV5(d, e.addr, "dash-1", "dash", appPassword)
		return err == nil && code == 0
	})

	slices.Sort(latencies)
	t.Logf("%d workers for %s: %s; verifications: %d, at most %d at once (bound %d)",
		workers, elapsed.Round(time.Millisecond), codes.String(), verified, verify.peak.Load(), concurrency)
	t.Logf("heap in use: %.1f MiB before, peak %.1f MiB during the flood, %.1f MiB after it and a GC; "+
		"heap held from the OS after the GC: %.1f MiB (before %.1f MiB)",
		mib(before.heapObjects), mib(peak), mib(after.heapObjects), mib(after.heapHeld), mib(before.heapHeld))
	t.Logf("genuine terminal: %d logins, %d failed; latency p50 %s, p99 %s, max %s",
		len(latencies), len(failed), percentile(latencies, 50), percentile(latencies, 99), percentile(latencies, 100))

	if got := verify.peak.Load(); got > int64(concurrency) {
		t.Errorf("%d verifications ran at once, bound %d", got, concurrency)
	}
	// One more verification than the bucket holds may start at the very
	// moment the elapsed time is read.
	if budget := burst + rate*elapsed.Seconds() + 1; float64(verified) > budget {
		t.Errorf("%d verifications in %s, rate budget %.0f", verified, elapsed.Round(time.Millisecond), budget)
	}
	// One verification holds 19 MiB; the GC lets the heap grow to twice
	// what was live when it last ran.
	bound := uint64(90+2*argonMiB*concurrency) << 20
	if grew := peak - min(peak, before.heapObjects); grew > bound {
		t.Errorf("heap grew by %.1f MiB during the flood, bound %.0f MiB", mib(grew), mib(bound))
	}
	if grew := after.heapObjects - min(after.heapObjects, before.heapObjects); grew > bound {
		t.Errorf("heap grew by %.1f MiB after the flood, bound %.0f MiB", mib(grew), mib(bound))
	}
	if len(latencies) == 0 || len(failed) > 0 {
		t.Errorf("genuine terminal: %d of %d logins failed: %v", len(failed), len(latencies), failed)
	}
	if !appIn {
		t.Errorf("a genuine application was not let in after the flood")
	}
}

// TestAppBusyRefusal: a login over the budgets is refused before its name
// is looked up, with the same answer for a known and an unknown name:
// MQTT 5 0x89 (server busy), 3.1.1 0x05; the reason is "busy".
func TestAppBusyRefusal(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(o *hook.Options) {
		o.Apps = hook.AppLimitOptions{RatePerAddr: 0.001, BurstPerAddr: 1} // one verification per address
	})
	pw := e.addApp("dash")
	if _, code := dialV5(t, e.addr, "dash-1", "dash", pw, true); code != 0 {
		t.Fatalf("first login: 0x%02x", code)
	}
	for _, name := range []string{"dash", "nobody"} {
		if _, code := dialV5(t, e.addr, name+"-2", name, pw, true); code != byte(packets.ErrServerBusy.Code) {
			t.Fatalf("%s over budget, MQTT 5: 0x%02x, want 0x89", name, code)
		}
		if _, code := e.pahoConnect(name+"-3", name, pw, true, nil); code != v3NotAuthorized {
			t.Fatalf("%s over budget, MQTT 3.1.1: %d, want 5", name, code)
		}
	}
	if got := e.counter("m2mguard_logins_total", "result", "refused", "reason", "busy"); got != 4 {
		t.Fatalf("busy refusals %v, want 4", got)
	}
	// Another address has its own budget.
	if _, code := dialV5From(t, "127.0.0.2", e.addr, "dash-4", "dash", pw); code != 0 {
		t.Fatalf("from another address: 0x%02x", code)
	}
}

// TestAppRefusalLogClipsName: an application login refused before or after
// its verification logs at most 64 bytes of the name it claimed, not the
// 64 KiB a CONNECT may carry.
func TestAppRefusalLogClipsName(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(o *hook.Options) {
		o.Apps = hook.AppLimitOptions{RatePerAddr: 0.001, BurstPerAddr: 1}
	})
	long := strings.Repeat("n", 20000)
	for _, want := range []byte{v5BadCredentials, byte(packets.ErrServerBusy.Code)} { // verified, then over budget
		if _, code := dialV5(t, e.addr, "", long, []byte("not-the-password"), true); code != want {
			t.Fatalf("CONNACK 0x%02x, want 0x%02x", code, want)
		}
	}
	if n := strings.Count(e.logs.String(), `"reason":"`); n != 2 {
		t.Fatalf("%d refusals logged, want 2", n)
	}
	if strings.Contains(e.logs.String(), strings.Repeat("n", 100)) {
		t.Fatal("the log holds more than 64 bytes of the claimed name")
	}
}

// countingRegistry counts the password verifications (VerifyApp calls) in
// all and at once.
type countingRegistry struct {
	hook.Registry
	running, peak, total atomic.Int64
}

func (r *countingRegistry) VerifyApp(ctx context.Context, name string, password []byte) (*keysvc.App, error) {
	n := r.running.Add(1)
	defer r.running.Add(-1)
	r.total.Add(1)
	for p := r.peak.Load(); n > p && !r.peak.CompareAndSwap(p, n); p = r.peak.Load() {
	}
	return r.Registry.VerifyApp(ctx, name, password)
}

// connectV5 sends an MQTT 5 CONNECT on a new connection and returns the
// CONNACK reason code and how long the answer took; the connection is
// closed. Unlike dialV5 it never fails the test, so that flood workers may
// call it.
func connectV5(d net.Dialer, addr, clientID, username string, password []byte) (byte, time.Duration, error) {
	start := time.Now()
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return 0, time.Since(start), err
	}
	defer conn.Close()
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 5,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: clientID,
			UsernameFlag: true, Username: []byte(username), PasswordFlag: true, Password: password,
		},
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		return 0, time.Since(start), err
	}
	conn.SetDeadline(time.Now().Add(d.Timeout))
	if _, err := conn.Write(buf.Bytes()); err != nil {
		return 0, time.Since(start), err
	}
	// CONNACK: type, remaining length, flags, reason code, properties.
	r := bufio.NewReader(conn)
	var head [2]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return 0, time.Since(start), err
	}
	body := make([]byte, head[1])
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, time.Since(start), err
	}
	if head[0]>>4 != packets.Connack || len(body) < 2 {
		return 0, time.Since(start), fmt.Errorf("got % x, want a CONNACK", append(head[:], body...))
	}
	return body[1], time.Since(start), nil
}

// codeCounts counts CONNACK reason codes and connection errors.
type codeCounts struct {
	mu     sync.Mutex
	codes  map[byte]int
	errors int
}

func (c *codeCounts) add(code byte, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		c.errors++
		return
	}
	if c.codes == nil {
		c.codes = map[byte]int{}
	}
	c.codes[code]++
}

func (c *codeCounts) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	total := c.errors
	for _, n := range c.codes {
		total += n
	}
	s := fmt.Sprintf("%d attempts", total)
	for _, code := range slices.Sorted(func(yield func(byte) bool) {
		for k := range c.codes {
			if !yield(k) {
				return
			}
		}
	}) {
		s += fmt.Sprintf(", %d × 0x%02x", c.codes[code], code)
	}
	return s + fmt.Sprintf(", %d connection errors", c.errors)
}

// memStats are the runtime's heap figures: objects (live and not yet swept)
// and the heap memory held from the OS (mapped, not released).
type memStats struct{ heapObjects, heapHeld uint64 }

func readMem() memStats {
	s := []metrics.Sample{
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/unused:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
	}
	metrics.Read(s)
	objects := s[0].Value.Uint64()
	return memStats{heapObjects: objects, heapHeld: objects + s[1].Value.Uint64() + s[2].Value.Uint64()}
}

// heapSampler records the peak of the heap's objects until stopped.
type heapSampler struct {
	done chan struct{}
	wg   sync.WaitGroup
	peak uint64
}

func startHeapSampler() *heapSampler {
	h := &heapSampler{done: make(chan struct{})}
	h.wg.Go(func() {
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			h.peak = max(h.peak, readMem().heapObjects)
			select {
			case <-h.done:
				return
			case <-tick.C:
			}
		}
	})
	return h
}

// stop ends the sampling and returns the peak.
func (h *heapSampler) stop() uint64 {
	close(h.done)
	h.wg.Wait()
	return h.peak
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// percentile returns the p-th percentile of sorted durations.
func percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, (len(sorted)*p)/100)].Round(10 * time.Microsecond)
}

func envInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

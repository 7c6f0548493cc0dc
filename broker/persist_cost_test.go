package broker_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// TestPersistenceCost measures what mqtt.persistence costs, as ratios to
// persistence off within the same round (BENCHMARKS.md, "Persistence"):
// connect rate (clean and persistent sessions) and QoS 1 publish rate
// (downlink to offline persistent sessions, uplink to an application
// with a clean or a persistent session), each mode on a fresh broker,
// modes interleaved round by round. A documented run:
//
//	M2MGUARD_MEASURE=1 go test ./broker -run TestPersistenceCost -v -timeout 30m
//
// M2MGUARD_MEASURE_ROUNDS (default 5) and M2MGUARD_MEASURE_N (terminals,
// default 400) change its size. CI runs it once, tiny, for its plumbing.
func TestPersistenceCost(t *testing.T) {
	rounds, n, msgs := 1, 20, 100
	if os.Getenv("M2MGUARD_MEASURE") != "" {
		rounds, n, msgs = envInt(t, "M2MGUARD_MEASURE_ROUNDS", 5), envInt(t, "M2MGUARD_MEASURE_N", 400), 4000
	} else {
		t.Parallel() // the tiny run measures nothing: it may share the machine
	}
	modes := []string{"off", "on", "sync"}
	results := map[string][]costResult{}
	for r := range rounds {
		order := append(modes[r%len(modes):], modes[:r%len(modes)]...)
		for _, mode := range order {
			res := measurePersistence(t, mode, n, msgs)
			results[mode] = append(results[mode], res)
			t.Logf("round %d %-4s %s", r+1, mode, res)
		}
	}
	for _, mode := range []string{"on", "sync"} {
		for _, what := range []string{"rate", "capacity"} {
			var ratios [len(costNames)][]float64
			for r := range rounds {
				on, off := results[mode][r], results["off"][r]
				for i := range costNames {
					if what == "rate" {
						ratios[i] = append(ratios[i], on.rate[i]/off.rate[i])
					} else {
						ratios[i] = append(ratios[i], on.capacity[i]/off.capacity[i])
					}
				}
			}
			for i, name := range costNames {
				med := slices.Clone(ratios[i])
				slices.Sort(med)
				t.Logf("%-4s / off  %-8s %-58s median %.3f  rounds %s", mode, what, name, med[len(med)/2], fmtRatios(ratios[i]))
			}
		}
	}
}

var costNames = [...]string{
	"connects/s, clean session (CONNECT, SUBSCRIBE, DISCONNECT)",
	"connects/s, persistent session (the same)",
	"QoS 1 downlinks/s to offline persistent sessions",
	"QoS 1 uplinks/s to an application, clean session",
	"QoS 1 uplinks/s to an application, persistent session",
}

// costResult holds, per scenario, the rate (operations per second of
// wall time) and the capacity (operations per CPU-second of the whole test
// process: broker and clients). The capacity hardly moves with whatever
// else runs on the machine; it does not see the waits for fsync.
type costResult struct {
	rate, capacity [len(costNames)]float64
}

func (r costResult) String() string {
	return fmt.Sprintf("connect clean %6.0f/s (%6.0f/CPU-s)  persistent %6.0f/s (%6.0f)  downlink %6.0f/s (%6.0f)  uplink to clean app %6.0f/s (%6.0f)  to persistent app %6.0f/s (%6.0f)",
		r.rate[0], r.capacity[0], r.rate[1], r.capacity[1], r.rate[2], r.capacity[2], r.rate[3], r.capacity[3], r.rate[4], r.capacity[4])
}

func fmtRatios(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.FormatFloat(x, 'f', 3, 64)
	}
	return strings.Join(s, ", ")
}

func envInt(t *testing.T, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := strconv.Atoi(s)
	if err != nil || v < 1 {
		t.Fatalf("%s=%q: want a positive number", name, s)
	}
	return v
}

// measurePersistence starts a broker with mqtt.persistence = mode and runs
// the five scenarios against it, 8 clients at a time.
func measurePersistence(t *testing.T, mode string, n, msgs int) costResult {
	t.Helper()
	const workers = 8
	cfg := testConfig(t)
	cfg.Admin.Listen = ""
	cfg.MQTT.Persistence = mode
	cfg.MQTT.MaxConnsPerAddr = 10 * n
	cfg.Auth.AppConcurrencyPerAddr, cfg.Auth.AppRatePerAddr, cfg.Auth.AppConcurrency = workers, 1000, workers
	b, err := broker.Start(t.Context(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := t.Context()
	var csv strings.Builder
	csv.WriteString("sn,imei,imsi,msisdn,alg\n")
	for i := range n {
		fmt.Fprintf(&csv, "P%d,35449404%07d,46002%07d,,hs256\n", i, i, i)
	}
	if _, err := b.Service().Import(ctx, strings.NewReader(csv.String()), keysvc.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	terms := make([]*keysvc.Terminal, n)
	for i := range n {
		if terms[i], err = b.Service().Get(ctx, fmt.Sprintf("P%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	// The applications log in before each measured span, not in it: the
	// cheapest hash costs spare the run their argon2id time.
	appPW := []byte("cost-app-password")
	addApp(t, b, "cost", appPW)
	addr := b.Addr("tcp")
	var res costResult
	measure := func(i, count int, f func(worker int)) {
		var wg sync.WaitGroup
		cpu0, start := cpuTime(), time.Now()
		for w := range workers {
			wg.Add(1)
			go func() { defer wg.Done(); f(w) }()
		}
		wg.Wait()
		res.rate[i] = float64(count) / time.Since(start).Seconds()
		res.capacity[i] = float64(count) / (cpuTime() - cpu0).Seconds()
	}
	// Connects: every terminal once with a clean session, then once with
	// a persistent one (which stays, offline).
	for i, clean := range []bool{true, false} {
		measure(i, n, func(w int) {
			for j := w; j < n; j += workers {
				c := dialRaw(t, addr, terms[j].SN, terms[j].Identity().Username(), terminalPassword(t, terms[j]), clean)
				c.subscribe(t, "m2m/"+terms[j].SN+"/down/#")
				c.disconnect()
			}
		})
	}
	// Downlink to the terminals' offline persistent sessions.
	apps := make([]*rawConn, workers)
	for w := range apps {
		apps[w] = dialRaw(t, addr, fmt.Sprintf("cost-%d", w), "cost", appPW, true)
	}
	measure(2, msgs, func(w int) {
		for j := w; j < msgs; j += workers {
			apps[w].publish(t, "m2m/"+terms[j%n].SN+"/down/cmd", []byte("set 21.5"))
		}
	})
	// Uplink to an application with a clean session, then with a
	// persistent one (the clean one first: a persistent subscriber stays).
	pubs := make([]*rawConn, workers)
	for w := range pubs {
		pubs[w] = dialRaw(t, addr, terms[w].SN, terms[w].Identity().Username(), terminalPassword(t, terms[w]), true)
	}
	for i, clean := range []bool{true, false} {
		sink := dialRaw(t, addr, fmt.Sprintf("cost-sink%d", i), "cost", appPW, clean)
		sink.subscribe(t, "m2m/+/up/#")
		received := sink.drain()
		measure(3+i, msgs, func(w int) {
			for j := w; j < msgs; j += workers {
				pubs[w].publish(t, "m2m/"+terms[w].SN+"/up/temp", []byte(`{"t":21.5}`))
			}
		})
		// mochi drops a message for an online client whose outbound queue
		// (mqtt.max_writes_pending) is full, keeping it in flight until
		// the client reconnects: wait until everything arrived or nothing
		// more does.
		for last, since := int64(-1), time.Now(); received.Load() < int64(msgs); time.Sleep(10 * time.Millisecond) {
			if n := received.Load(); n != last {
				last, since = n, time.Now()
			} else if time.Since(since) > 3*time.Second {
				t.Logf("%s: the application received %d of %d uplinks (the rest dropped from its full queue)", mode, n, msgs)
				break
			}
		}
		sink.disconnect()
	}
	return res
}

// cpuTime is the CPU time the process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func terminalPassword(t *testing.T, tm *keysvc.Terminal) []byte {
	var nonce [8]byte
	rand.Read(nonce[:])
	l := codec.Login{Identity: tm.Identity(), Alg: tm.Alg, TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(nonce[:]))}
	pw, err := l.Sign(tm.Creds.Up)
	if err != nil {
		t.Fatal(err)
	}
	return pw
}

// rawConn is a minimal MQTT 3.1.1 client: one request at a time, or a
// subscriber that acknowledges everything (drain).
type rawConn struct {
	c  net.Conn
	r  *bufio.Reader
	id uint16
	mu sync.Mutex // writes, once drain runs
}

func dialRaw(t *testing.T, addr, clientID, username string, password []byte, clean bool) *rawConn {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: clean, Keepalive: 600, ClientIdentifier: clientID,
			UsernameFlag: true, Username: []byte(username), PasswordFlag: true, Password: password}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rc := &rawConn{c: c, r: bufio.NewReader(c)}
	rc.write(t, buf.Bytes())
	if fh, body := rc.read(t); fh.Type != packets.Connack || body[1] != 0 {
		t.Fatalf("%s: login refused (%d % x)", clientID, fh.Type, body)
	}
	return rc
}

func (rc *rawConn) write(t *testing.T, b []byte) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := rc.c.Write(b); err != nil {
		t.Errorf("write: %v", err)
	}
}

// read returns the next packet's fixed header and body.
func (rc *rawConn) read(t *testing.T) (packets.FixedHeader, []byte) {
	rc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var fh packets.FixedHeader
	b, err := rc.r.ReadByte()
	if err == nil {
		err = fh.Decode(b)
	}
	var n int
	if err == nil {
		n, _, err = packets.DecodeLength(rc.r)
	}
	body := make([]byte, n)
	if err == nil {
		_, err = io.ReadFull(rc.r, body)
	}
	if err != nil {
		t.Errorf("read: %v", err)
		return fh, make([]byte, 4)
	}
	return fh, body
}

func (rc *rawConn) subscribe(t *testing.T, filter string) {
	rc.id++
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 4, PacketID: rc.id,
		Filters: packets.Subscriptions{{Filter: filter, Qos: 1}}}
	var buf bytes.Buffer
	pk.SubscribeEncode(&buf)
	rc.write(t, buf.Bytes())
	if fh, body := rc.read(t); fh.Type != packets.Suback || body[2] >= 0x80 {
		t.Errorf("subscribe %s: %d % x", filter, fh.Type, body)
	}
}

// publish sends a QoS 1 PUBLISH and waits for its PUBACK.
func (rc *rawConn) publish(t *testing.T, topic string, payload []byte) {
	rc.id = rc.id%60000 + 1
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 4, PacketID: rc.id,
		TopicName: topic, Payload: payload}
	var buf bytes.Buffer
	pk.PublishEncode(&buf)
	rc.write(t, buf.Bytes())
	if fh, _ := rc.read(t); fh.Type != packets.Puback {
		t.Errorf("publish %s: got packet type %d, want PUBACK", topic, fh.Type)
	}
}

// drain acknowledges every PUBLISH it receives, counting them, until the
// connection closes.
func (rc *rawConn) drain() *atomic.Int64 {
	var n atomic.Int64
	go func() {
		for {
			rc.c.SetReadDeadline(time.Time{})
			b, err := rc.r.ReadByte()
			if err != nil {
				return
			}
			var fh packets.FixedHeader
			fh.Decode(b)
			l, _, err := packets.DecodeLength(rc.r)
			if err != nil {
				return
			}
			body := make([]byte, l)
			if _, err := io.ReadFull(rc.r, body); err != nil {
				return
			}
			if fh.Type != packets.Publish || fh.Qos == 0 {
				continue
			}
			tl := int(binary.BigEndian.Uint16(body))
			id := body[2+tl : 4+tl]
			rc.mu.Lock()
			rc.c.Write([]byte{0x40, 2, id[0], id[1]})
			rc.mu.Unlock()
			n.Add(1)
		}
	}()
	return &n
}

func (rc *rawConn) disconnect() {
	rc.mu.Lock()
	rc.c.Write([]byte{0xe0, 0})
	rc.mu.Unlock()
	rc.c.Close()
}

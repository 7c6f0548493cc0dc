package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/freeport"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

// TestAppLoginFloodBinary is the documented run of the application login
// flood (SECURITY.md, attacks tried) against the broker binary with its
// default configuration: workers flood application logins with a fresh
// name each time, from addresses 127.0.1.1 to 127.0.1.<n> in turn, while a
// genuine terminal logs in every 25 ms from 127.0.0.3. It reports the
// broker's RSS before, at its peak and after the flood, and the terminal's
// login latency; it asserts that RSS grew by less than 256 MiB, that every
// terminal login succeeded and that a genuine application gets in once
// the flood stops.
//
//	M2MGUARD_APPFLOOD_SECONDS=20 go test -run TestAppLoginFloodBinary -v -timeout 10m ./cmd/m2mguard-broker
//
// M2MGUARD_APPFLOOD_WORKERS (default 256) sets the workers,
// M2MGUARD_APPFLOOD_ADDRS (default 2) the n addresses they come from (more
// addresses than the global budget's rate keep it spent all the time),
// M2MGUARD_APPFLOOD_BIN runs another build (an older one, to compare).
func TestAppLoginFloodBinary(t *testing.T) {
	seconds := os.Getenv("M2MGUARD_APPFLOOD_SECONDS")
	if seconds == "" {
		t.Skip("documented run: set M2MGUARD_APPFLOOD_SECONDS")
	}
	duration := time.Duration(atoiEnv(t, "M2MGUARD_APPFLOOD_SECONDS", 20)) * time.Second
	workers := atoiEnv(t, "M2MGUARD_APPFLOOD_WORKERS", 256)
	addrs := min(atoiEnv(t, "M2MGUARD_APPFLOOD_ADDRS", 2), 254)
	dir := t.TempDir()
	bin := os.Getenv("M2MGUARD_APPFLOOD_BIN")
	if bin == "" {
		bin = buildBinary(t)
	}
	work := filepath.Join(dir, "work")
	os.Mkdir(work, 0o755)
	logFile, err := os.Create(filepath.Join(dir, "broker.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	mqttAddr, adminAddr := freeport.Addr(t), freeport.Addr(t)
	cmd := exec.Command(bin, "--mqtt-tcp", mqttAddr, "--mqtt-ws", "off", "--admin-listen", adminAddr)
	cmd.Dir = work
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	base := "http://" + adminAddr
	testwait.For(t, 30*time.Second, "the broker healthy", func() bool {
		resp, err := http.Get(base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	api := adminClient(t, base, work)
	term, err := api.Register(t.Context(), adminapi.RegisterRequest{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		t.Fatal(err)
	}
	appPassword := "dashboard-password-0001"
	if _, err := api.AddApp(t.Context(), adminapi.AppRequest{Name: "dash", Password: appPassword}); err != nil {
		t.Fatal(err)
	}

	from := func(ip string) net.Dialer {
		return net.Dialer{Timeout: 30 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	}
	terminalLogin := func() (byte, time.Duration, error) {
		var n [8]byte
		rand.Read(n[:])
		l := codec.Login{Identity: codec.Identity{SN: term.SN, IMEI: term.IMEI, IMSI: term.IMSI}, Alg: codec.HS256,
			TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(n[:]))}
		pw, err := l.Sign([]byte(term.Up))
		if err != nil {
			t.Fatal(err)
		}
		return connectV5(from("127.0.0.3"), mqttAddr, term.SN, l.Username(), pw)
	}
	if code, _, err := terminalLogin(); err != nil || code != 0 {
		t.Fatalf("terminal login before the flood: 0x%02x %v", code, err)
	}
	pid := cmd.Process.Pid
	rssBefore := rss(t, pid, "VmRSS")

	peak := atomic.Uint64{}
	peak.Store(rssBefore)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { // RSS sampler
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				peak.Store(max(peak.Load(), rss(t, pid, "VmRSS")))
			}
		}
	})
	var mu sync.Mutex
	codes := map[string]int{}
	for w := range workers {
		d := from(fmt.Sprintf("127.0.1.%d", 1+w%addrs))
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				name := fmt.Sprintf("flood-%d-%d", w, i)
				code, _, err := connectV5(d, mqttAddr, name+"-c", name, []byte("not-the-password"))
				key := fmt.Sprintf("0x%02x", code)
				if err != nil {
					key = "no CONNACK"
				}
				mu.Lock()
				codes[key]++
				mu.Unlock()
			}
		})
	}
	var latencies []time.Duration
	var failed []string
	start := time.Now()
	tick := time.NewTicker(25 * time.Millisecond)
	for time.Since(start) < duration {
		<-tick.C
		code, took, err := terminalLogin()
		latencies = append(latencies, took)
		if err != nil || code != 0 {
			failed = append(failed, fmt.Sprintf("0x%02x %v", code, err))
		}
	}
	tick.Stop()
	close(stop)
	wg.Wait()
	rssAfter := rss(t, pid, "VmRSS")
	hwm := rss(t, pid, "VmHWM")

	appIn := false
	for deadline := time.Now().Add(30 * time.Second); !appIn && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		code, _, err := connectV5(from("127.0.0.4"), mqttAddr, "dash-1", "dash", []byte(appPassword))
		appIn = err == nil && code == 0
	}
	// How long the runtime takes to give the memory back (reported only):
	// until RSS is within 32 MiB of where it started, for at most 60 s.
	returned := time.Now()
	rssLater := rssAfter
	for deadline := returned.Add(60 * time.Second); rssLater > rssBefore+32<<20 && time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		rssLater = rss(t, pid, "VmRSS")
	}

	slices.Sort(latencies)
	mu.Lock()
	t.Logf("%d workers from %d addresses for %s: %v", workers, addrs, duration, codes)
	mu.Unlock()
	t.Logf("broker RSS: %.1f MiB before, peak %.1f MiB (sampled; VmHWM %.1f MiB), %.1f MiB right after, %.1f MiB %s later",
		mibOf(rssBefore), mibOf(peak.Load()), mibOf(hwm), mibOf(rssAfter), mibOf(rssLater), time.Since(returned).Round(100*time.Millisecond))
	t.Logf("genuine terminal: %d logins, %d failed; latency p50 %s, p99 %s, max %s",
		len(latencies), len(failed), pct(latencies, 50), pct(latencies, 99), pct(latencies, 100))
	if grew := max(peak.Load(), hwm) - rssBefore; grew > 256<<20 {
		t.Errorf("RSS grew by %.1f MiB, bound 256 MiB", mibOf(grew))
	}
	if len(latencies) == 0 || len(failed) > 0 {
		t.Errorf("genuine terminal: %d of %d logins failed: %v", len(failed), len(latencies), failed[:min(len(failed), 5)])
	}
	if !appIn {
		t.Error("a genuine application was not let in after the flood")
	}
}

// rss reads a size field (VmRSS, VmHWM) of /proc/<pid>/status, in bytes.
func rss(t *testing.T, pid int, field string) uint64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Errorf("read status: %v", err)
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err == nil {
				return kb << 10
			}
		}
	}
	t.Errorf("no %s in /proc/%d/status", field, pid)
	return 0
}

// connectV5 sends an MQTT 5 CONNECT on a new connection and returns the
// CONNACK reason code and how long the answer took; the connection is
// closed. It never fails the test, so that flood workers may call it.
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
	r := bufio.NewReader(conn)
	var head [2]byte // type, remaining length (a CONNACK is short)
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

func pct(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, len(sorted)*p/100)].Round(10 * time.Microsecond)
}

func mibOf(b uint64) float64 { return float64(b) / (1 << 20) }

func atoiEnv(t *testing.T, name string, def int) int {
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

package fleettest

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/fleetroute"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
)

// TestRouteCost measures what crossing brokers costs a message in fleet
// mode (BENCHMARKS.md, "Fleet mode: messages across brokers"): rate and
// latency of QoS 1 uplinks and downlinks whose publisher and receiver are
// on the same broker of a fleet, on two brokers of it, and on a single
// broker without fleet mode (the real "within one broker" baseline). The
// fleet is three brokers with embedded NATS nodes (a 3-node JetStream
// cluster, the streams' default replicas) on one real Vault; the single
// broker uses the same Vault. Placements are interleaved, their order
// rotated every round; each message carries its send time, each receiver
// takes its latency. It asserts only that every message arrives. A
// documented run:
//
//	M2MGUARD_MEASURE=1 M2MGUARD_VAULT_BIN=/work/main/.bin/vault go test ./broker/fleettest -run TestRouteCost -v -timeout 30m
//
// M2MGUARD_MEASURE_ROUNDS (default 3), M2MGUARD_MEASURE_UPLINKS (per
// round and deployment, default 2000) and M2MGUARD_MEASURE_DOWNLINKS (per
// round and placement, default 800) change its size.
func TestRouteCost(t *testing.T) {
	if os.Getenv("M2MGUARD_MEASURE") == "" {
		t.Skip("a measurement: M2MGUARD_MEASURE=1 runs it (BENCHMARKS.md)")
	}
	rounds := envInt(t, "M2MGUARD_MEASURE_ROUNDS", 3)
	upN := envInt(t, "M2MGUARD_MEASURE_UPLINKS", 2000)
	downN := envInt(t, "M2MGUARD_MEASURE_DOWNLINKS", 800)
	const k = 4 // terminals publishing (uplinks) or addressed (downlinks) at once

	// mqtt.max_writes_pending 8192 (mochi's default) on every broker: with
	// the default 256 a single broker outruns an application slowed by a
	// busy machine and mochi drops what its queue cannot take (counted in
	// MessagesDropped); a measurement must lose nothing.
	const writesPending = 8192
	v := vaulttest.Start(t)
	mode := fleetMode(t, 3)
	f := startFleet(t, v, 3, func(i int, cfg *broker.Config) {
		mode(i, cfg)
		cfg.MQTT.MaxWritesPending = writesPending
	})
	A, B := f.members[0], f.members[1]
	single := startFleet(t, v, 1, func(_ int, cfg *broker.Config) {
		cfg.Store.Vault.Prefix = "single"
		cfg.MQTT.MaxWritesPending = writesPending
	})
	S := single.members[0]

	// Terminals: k uplink publishers on A and on S; k downlink receivers
	// on A, on B and on S.
	var downSNs []string
	for _, p := range []string{"DA", "DB", "DS"} {
		for i := range k {
			downSNs = append(downSNs, fmt.Sprintf("RC%s%d", p, i+1))
		}
	}
	var publish []string
	for _, sn := range downSNs {
		publish = append(publish, "m2m/"+sn+"/down/#")
	}
	appReq := adminapi.AppRequest{Name: "costapp", Subscribe: []string{"m2m/+/up/#"}, Publish: publish}
	appF, err := A.api.AddApp(t.Context(), appReq)
	if err != nil {
		t.Fatal(err)
	}
	appS, err := S.api.AddApp(t.Context(), appReq)
	if err != nil {
		t.Fatal(err)
	}
	upRecA, upRecB, upRecS := &latRec{}, &latRec{}, &latRec{}
	costSubscriber(t, A, appF, "costapp-upa", upRecA)
	costSubscriber(t, B, appF, "costapp-upb", upRecB)
	costSubscriber(t, S, appS, "costapp-ups", upRecS)
	pubF := appClient(t, A, "costapp-downa", appF.Password)
	pubS := appClient(t, S, "costapp-downs", appS.Password)

	upF := costTerminals(t, f, 0, A, "RCUA", k, nil)
	upS := costTerminals(t, single, 0, S, "RCUS", k, nil)
	downRec := map[string]*latRec{"DA": {}, "DB": {}, "DS": {}}
	downA := costTerminals(t, f, 0, A, "RCDA", k, downRec["DA"])
	downB := costTerminals(t, f, 0, B, "RCDB", k, downRec["DB"])
	downS := costTerminals(t, single, 0, S, "RCDS", k, downRec["DS"])

	type runSpec struct {
		name string
		run  func(round int) map[string]latStats
	}
	// lost describes what the brokers dropped, for a failure.
	lost := func() string {
		var out []string
		for i, m := range append(slices.Clone(f.members), S) {
			name := "fleet " + m.name
			if i == len(f.members) {
				name = "single"
			}
			out = append(out, fmt.Sprintf("%s: %d dropped (queue full), %d inflight dropped", name,
				atomic.LoadInt64(&m.b.Server().Info.MessagesDropped), atomic.LoadInt64(&m.b.Server().Info.InflightDropped)))
		}
		return strings.Join(out, "; ")
	}
	uplinks := func(terms []*costTerminal, recs map[string]*latRec) func(int) map[string]latStats {
		return func(round int) map[string]latStats {
			for _, r := range recs {
				r.reset()
			}
			start := time.Now()
			runUplinks(t, terms, round, upN)
			out := map[string]latStats{}
			for name, r := range recs {
				if !testwait.Until(60*time.Second, func() bool { return r.distinct() >= upN }) {
					t.Fatalf("round %d %s: %d of %d uplinks received (%s)", round, name, r.distinct(), upN, lost())
				}
				out[name] = r.stats(start)
			}
			return out
		}
	}
	downlinks := func(name string, pub paho.Client, terms []*costTerminal, rec *latRec) func(int) map[string]latStats {
		return func(round int) map[string]latStats {
			rec.reset()
			start := time.Now()
			runDownlinks(t, pub, terms, round, downN)
			if !testwait.Until(60*time.Second, func() bool { return rec.distinct() >= downN }) {
				t.Fatalf("round %d %s: %d of %d downlinks received (%s)", round, name, rec.distinct(), downN, lost())
			}
			return map[string]latStats{name: rec.stats(start)}
		}
	}
	specs := []runSpec{
		// Both fleet applications receive the same uplinks: one on the
		// terminals' broker, one across.
		{"uplinks fleet", uplinks(upF, map[string]*latRec{"up fleet same": upRecA, "up fleet cross": upRecB})},
		{"uplinks single", uplinks(upS, map[string]*latRec{"up single": upRecS})},
		{"downlinks fleet same", downlinks("down fleet same", pubF, downA, downRec["DA"])},
		{"downlinks fleet cross", downlinks("down fleet cross", pubF, downB, downRec["DB"])},
		{"downlinks single", downlinks("down single", pubS, downS, downRec["DS"])},
	}
	leaders(t, f)
	results := map[string][]latStats{}
	for r := range rounds {
		order := append(slices.Clone(specs[r%len(specs):]), specs[:r%len(specs)]...)
		for _, s := range order {
			for name, st := range s.run(r + 1) {
				results[name] = append(results[name], st)
				t.Logf("round %d %-17s %s", r+1, name, st)
			}
		}
	}

	var tb strings.Builder
	tb.WriteString("\n| placement | msgs/s | p50 | p95 | p99 | dups |\n|---|---|---|---|---|---|\n")
	names := []string{"up single", "up fleet same", "up fleet cross", "down single", "down fleet same", "down fleet cross"}
	for _, name := range names {
		rs := results[name]
		fmt.Fprintf(&tb, "| %s | %.0f | %s | %s | %s | %d |\n", name,
			median(rs, func(s latStats) float64 { return s.rate }),
			msDur(median(rs, func(s latStats) float64 { return float64(s.p50) })),
			msDur(median(rs, func(s latStats) float64 { return float64(s.p95) })),
			msDur(median(rs, func(s latStats) float64 { return float64(s.p99) })),
			sumDups(rs))
	}
	tb.WriteString("\n| ratio (per round, median) | msgs/s | p50 | p99 | rounds (msgs/s; p50) |\n|---|---|---|---|---|\n")
	for _, p := range [][2]string{
		{"up fleet cross", "up fleet same"}, {"up fleet same", "up single"},
		{"down fleet cross", "down fleet same"}, {"down fleet same", "down single"}, {"down fleet cross", "down single"},
	} {
		var rate, p50, p99 []float64
		for r := range rounds {
			x, y := results[p[0]][r], results[p[1]][r]
			rate = append(rate, x.rate/y.rate)
			p50 = append(p50, float64(x.p50)/float64(y.p50))
			p99 = append(p99, float64(x.p99)/float64(y.p99))
		}
		var per []string
		for r := range rounds {
			per = append(per, fmt.Sprintf("%.2f; %.2f", rate[r], p50[r]))
		}
		fmt.Fprintf(&tb, "| %s / %s | %.2f | %.2f | %.2f | %s |\n", p[0], p[1], med(rate), med(p50), med(p99), strings.Join(per, " · "))
	}
	t.Log(tb.String())
	leaders(t, f)
}

// leaders logs which NATS node leads the routing streams and each
// broker's uplink consumer, and which node each broker is connected to: a
// JetStream request (a downlink drain's read and delete) costs a route
// hop more from a broker whose node does not lead the stream.
func leaders(t *testing.T, f *testFleet) {
	t.Helper()
	js, err := jetstream.New(f.members[0].b.Fleet().Conn())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range f.members {
		out = append(out, fmt.Sprintf("%s on node %s", m.name, m.b.Fleet().Conn().ConnectedServerName()))
	}
	for _, name := range []string{fleetroute.UplinkStream, fleetroute.DownlinkStream} {
		s, err := js.Stream(t.Context(), name)
		if err != nil {
			t.Fatal(err)
		}
		info, err := s.Info(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if info.Cluster != nil {
			out = append(out, fmt.Sprintf("%s led by %s", name, info.Cluster.Leader))
		}
		if name != fleetroute.UplinkStream {
			continue
		}
		for c := range s.ListConsumers(t.Context()).Info() {
			if c.Cluster != nil {
				out = append(out, fmt.Sprintf("consumer %s led by %s", c.Name, c.Cluster.Leader))
			}
		}
	}
	t.Logf("JetStream: %s", strings.Join(out, "; "))
}

// costTerminal is a reference terminal with a session key.
type costTerminal struct {
	sn string
	c  *client.Client
}

// costTerminals registers n terminals prefix1..n through f's broker reg
// and connects them to m with the reference client (session key, clean
// session); rec, if not nil, takes the latency of each downlink they
// receive.
func costTerminals(t *testing.T, f *testFleet, reg int, m *member, prefix string, n int, rec *latRec) []*costTerminal {
	t.Helper()
	var out []*costTerminal
	for i := range n {
		sn := fmt.Sprintf("%s%d", prefix, i+1)
		tm := f.register(t, reg, sn)
		rc := &client.Record{Identity: tm.Identity(), Alg: tm.Alg, Current: client.Credentials{
			Up: tm.Creds.Up, UpExp: tm.Creds.UpExp, Down: tm.Creds.Down, DownExp: tm.Creds.DownExp, BK: tm.Creds.BK, BKExp: tm.Creds.BKExp}}
		cfg := client.Config{Brokers: []string{"tcp://" + m.b.Addr("tcp")}, Identity: rc.Identity, Alg: rc.Alg,
			Store: client.NewMemStore(rc), SessionKey: true, CleanSession: true}
		if rec != nil {
			cfg.OnData = func(_ string, payload []byte) { rec.add(sn, payload) }
		}
		c, err := client.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		err = c.Connect(ctx)
		cancel()
		if err != nil {
			t.Fatalf("%s on %s: %v", sn, m.name, err)
		}
		checkFor(t, 10*time.Second, sn+"'s session has a key and takes downlinks", func() bool {
			for _, s := range m.b.Hook().Sessions() {
				if s.ClientID == sn {
					return s.SessionKey && m.b.Hook().DownlinkReady(sn)
				}
			}
			return false
		})
		out = append(out, &costTerminal{sn: sn, c: c})
	}
	return out
}

// runUplinks has the terminals publish total QoS 1 uplinks on "data",
// each waiting for its acknowledgement before the next; a payload is
// "round-i send-time-in-ns".
func runUplinks(t *testing.T, terms []*costTerminal, round, total int) {
	t.Helper()
	per := total / len(terms)
	var wg sync.WaitGroup
	errs := make(chan error, len(terms))
	for j, tr := range terms {
		n := per
		if j == len(terms)-1 {
			n = total - per*(len(terms)-1)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range n {
				ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
				err := tr.c.Publish(ctx, "data", fmt.Appendf(nil, "%d-%d %d", round, i, time.Now().UnixNano()), 1)
				cancel()
				if err != nil {
					errs <- fmt.Errorf("%s: uplink %d: %w", tr.sn, i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// runDownlinks has pub publish total QoS 1 downlinks, one goroutine per
// terminal, each waiting for its PUBACK before the next.
func runDownlinks(t *testing.T, pub paho.Client, terms []*costTerminal, round, total int) {
	t.Helper()
	per := total / len(terms)
	var wg sync.WaitGroup
	errs := make(chan error, len(terms))
	for j, tr := range terms {
		n := per
		if j == len(terms)-1 {
			n = total - per*(len(terms)-1)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := "m2m/" + tr.sn + "/down/cmd"
			for i := range n {
				tok := pub.Publish(topic, 1, false, fmt.Sprintf("%d-%d %d", round, i, time.Now().UnixNano()))
				if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
					errs <- fmt.Errorf("%s: downlink %d not acknowledged (%v)", tr.sn, i, tok.Error())
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// costSubscriber connects application app to m (paho, 3.1.1, clean
// session) subscribed to m2m/+/up/+ at QoS 1; rec takes each uplink's
// latency.
func costSubscriber(t *testing.T, m *member, app *adminapi.App, id string, rec *latRec) {
	t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + m.b.Addr("tcp")).SetClientID(id).
		SetUsername(app.Name).SetPassword(app.Password).SetCleanSession(true).SetAutoReconnect(false).SetProtocolVersion(4)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("app %s on %s: connect: %v", id, m.name, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	filter := "m2m/+/up/data"
	tok := c.Subscribe(filter, 1, func(_ paho.Client, msg paho.Message) { rec.add(msg.Topic(), msg.Payload()) })
	if !tok.WaitTimeout(15*time.Second) || tok.Error() != nil || tok.(*paho.SubscribeToken).Result()[filter] != 1 {
		t.Fatalf("app %s: subscribe: %v %v", id, tok.Error(), tok.(*paho.SubscribeToken).Result())
	}
}

// latRec records the messages a receiver got: per distinct message (by
// where and its "round-i"), the latency from the send time in its
// payload; and the time of the last.
type latRec struct {
	mu   sync.Mutex
	seen map[string]bool
	lat  []time.Duration
	dups int
	last time.Time
}

func (r *latRec) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seen, r.lat, r.dups, r.last = map[string]bool{}, nil, 0, time.Time{}
}

func (r *latRec) add(where string, payload []byte) {
	now := time.Now()
	id, ts, ok := strings.Cut(string(payload), " ")
	ns, err := strconv.ParseInt(ts, 10, 64)
	if !ok || err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen == nil {
		return // before the first run
	}
	key := where + " " + id
	if r.seen[key] {
		r.dups++
		return
	}
	r.seen[key] = true
	r.lat = append(r.lat, now.Sub(time.Unix(0, ns)))
	r.last = now
}

func (r *latRec) distinct() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}

// latStats is one receiver's figures in one run.
type latStats struct {
	n             int
	rate          float64 // messages received per second, from the first send to the last receipt
	p50, p95, p99 time.Duration
	dups          int
}

func (s latStats) String() string {
	return fmt.Sprintf("%6d msgs %8.0f msgs/s  p50 %8s  p95 %8s  p99 %8s  dups %d", s.n, s.rate, msDur(float64(s.p50)),
		msDur(float64(s.p95)), msDur(float64(s.p99)), s.dups)
}

func (r *latRec) stats(start time.Time) latStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := slices.Clone(r.lat)
	slices.Sort(l)
	q := func(p float64) time.Duration { return l[int(p*float64(len(l)-1))] }
	return latStats{n: len(l), rate: float64(len(l)) / r.last.Sub(start).Seconds(), p50: q(0.50), p95: q(0.95), p99: q(0.99), dups: r.dups}
}

func median(rs []latStats, f func(latStats) float64) float64 {
	var v []float64
	for _, s := range rs {
		v = append(v, f(s))
	}
	return med(v)
}

func med(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}

func sumDups(rs []latStats) int {
	n := 0
	for _, s := range rs {
		n += s.dups
	}
	return n
}

// msDur formats nanoseconds as milliseconds.
func msDur(ns float64) string { return fmt.Sprintf("%.2f ms", ns/1e6) }

// envInt is the positive integer in environment variable name, or def.
func envInt(t *testing.T, name string, def int) int {
	t.Helper()
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

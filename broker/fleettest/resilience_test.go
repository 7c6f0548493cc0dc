package fleettest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"github.com/m2mguard/m2mguard/internal/freeport"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

// natsCluster starts three NATS nodes with JetStream, routed to each
// other, outside the brokers (cluster.nats_urls), so that one can be
// killed while every broker lives. restart starts node i again, on its
// ports and files, in nodes[i]. The nodes stop at the test's end, after
// the brokers started after natsCluster (cleanups run last first): a
// broker leaves its fleet faster while NATS is up.
func natsCluster(t *testing.T) (nodes []*fleet.Node, restart func(i int)) {
	t.Helper()
	ports := freeport.Ports(t, 6)
	var routes []string
	for i := range 3 {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[3+i]))
	}
	dir := t.TempDir()
	start := func(i int) *fleet.Node {
		n, err := fleet.StartNode(fleet.NodeOptions{
			Name: fmt.Sprintf("nats%d", i+1), StoreDir: filepath.Join(dir, fmt.Sprintf("n%d", i+1)),
			Port: ports[i], ClusterName: "m2mguard-test", ClusterPort: ports[3+i], Routes: routes,
			Users:     []fleet.NodeUser{{Name: natsUser, Password: []byte(natsPassword)}},
			RouteUser: routeUser, RoutePassword: []byte(routePassword),
			Logger: quietLogger(), MaxStore: 256 << 20,
		})
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	nodes = make([]*fleet.Node, 3)
	t.Cleanup(func() {
		for _, n := range nodes {
			if n != nil {
				n.Shutdown()
			}
		}
	})
	for i := range nodes {
		nodes[i] = start(i)
	}
	return nodes, func(i int) { nodes[i] = start(i) }
}

// externalNATS configures the brokers for the nodes of natsCluster.
func externalNATS(nodes []*fleet.Node) func(i int, cfg *broker.Config) {
	var urls []string
	for _, n := range nodes {
		urls = append(urls, n.ClientURL())
	}
	return func(i int, cfg *broker.Config) {
		c := &cfg.Cluster
		c.BrokerID = fmt.Sprintf("broker%d", i+1)
		c.NATSURLs = urls
		c.NATSUser, c.NATSPassword = natsUser, natsPassword
		c.Heartbeat = 500 * time.Millisecond
	}
}

// connect5 is a terminal's MQTT 5 CONNECT with a fresh login token, so
// that the CONNACK tells an unavailable fleet (0x88) from a refusal.
func connect5(t testing.TB, tm *keysvc.Terminal) []byte {
	t.Helper()
	var nonce [8]byte
	rand.Read(nonce[:])
	l := codec.Login{Identity: tm.Identity(), Alg: tm.Alg, TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(nonce[:]))}
	pw, err := l.Sign(tm.Creds.Up)
	if err != nil {
		t.Fatal(err)
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 600, ClientIdentifier: tm.SN,
			UsernameFlag: true, Username: []byte(tm.Identity().Username()), PasswordFlag: true, Password: pw}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// try sends connect to addr and returns the CONNACK's reason code (0xff
// if the broker closed the connection without one); the connection is
// closed.
func try(addr string, connect []byte) byte {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return 0xfe
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := c.Write(connect); err != nil {
		return 0xfe
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil || ack[0] != 0x20 {
		return 0xff
	}
	return ack[3]
}

// TestFleetNATSLeaderLossDuringLoginStorm kills the node that leads the
// replay bucket while terminals log in on the three brokers, each login
// followed by a replay of its token on another broker: no replay is
// accepted, a genuine login is refused only as "server unavailable"
// (0x88, while JetStream elects a new leader) and never locked out, and
// logins resume. Then the whole cluster goes down: logins fail closed
// (0x88), the brokers say so (metric, event, a warning in the session
// list), and resume once the cluster is back.
func TestFleetNATSLeaderLossDuringLoginStorm(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	nodes, restart := natsCluster(t)
	f := startFleet(t, v, 3, externalNATS(nodes))
	const terminals = 24
	tms := make([]*keysvc.Terminal, terminals)
	for i := range tms {
		tms[i] = f.register(t, i%3, fmt.Sprintf("STORM%02d", i))
	}

	var (
		accepted, unavailable, replaysAccepted, refusedOther atomic.Int64
		afterKill                                            atomic.Int64 // logins accepted after the kill
		killed                                               atomic.Bool
		mu                                                   sync.Mutex
		others                                               []string
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 6 { // each worker owns its terminals: one login at a time per terminal
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := 0; ; round++ {
				select {
				case <-stop:
					return
				default:
				}
				tm := tms[w+6*(round%(terminals/6))]
				on, replayOn := f.members[round%3], f.members[(round+1)%3]
				connect := connect5(t, tm)
				switch code := try(on.b.Addr("tcp"), connect); code {
				case 0:
					accepted.Add(1)
					if killed.Load() {
						afterKill.Add(1)
					}
					if try(replayOn.b.Addr("tcp"), connect) == 0 {
						replaysAccepted.Add(1)
					}
				case 0x88:
					unavailable.Add(1)
				default:
					refusedOther.Add(1)
					mu.Lock()
					others = append(others, fmt.Sprintf("%s on %s: %#x", tm.SN, on.name, code))
					mu.Unlock()
				}
			}
		}()
	}
	checkFor(t, 10*time.Second, "logins under way", func() bool { return accepted.Load() >= 30 })
	leader := -1
	for i, n := range nodes {
		if n.IsStreamLeader("KV_" + fleet.ReplayBucket) {
			leader = i
		}
	}
	if leader < 0 {
		t.Fatal("no node leads the replay bucket")
	}
	before := accepted.Load()
	killedAt := time.Now()
	nodes[leader].Shutdown()
	killed.Store(true)
	t.Logf("killed %s, the replay bucket's leader, after %d accepted logins", nodes[leader].Name(), before)
	checkFor(t, 20*time.Second, "logins resume after the leader's loss", func() bool { return afterKill.Load() >= 30 })
	checkFor(t, 10*time.Second, "another node leads the replay bucket", func() bool {
		for i, n := range nodes {
			if i != leader && n.IsStreamLeader("KV_"+fleet.ReplayBucket) {
				return true
			}
		}
		return false
	})
	close(stop)
	wg.Wait()
	t.Logf("logins accepted %d (%d after the kill), refused as unavailable %d, refused otherwise %d; replays accepted %d",
		accepted.Load(), afterKill.Load(), unavailable.Load(), refusedOther.Load(), replaysAccepted.Load())
	if n := replaysAccepted.Load(); n != 0 {
		t.Errorf("%d replayed tokens accepted", n)
	}
	if n := refusedOther.Load(); n != 0 {
		t.Errorf("%d genuine logins refused other than as unavailable: %v", n, others)
	}
	// No lockout: every terminal logs in (the throttle is the fleet's:
	// one broker per terminal tells).
	for i, tm := range tms {
		m := f.members[i%3]
		checkFor(t, 10*time.Second, tm.SN+" logs in on "+m.name, func() bool { return try(m.b.Addr("tcp"), connect5(t, tm)) == 0 })
	}
	t.Logf("storm over, every terminal logged in, %v after the kill", time.Since(killedAt).Round(time.Millisecond))

	// The whole cluster down.
	down := time.Now()
	for _, n := range nodes {
		n.Shutdown()
	}
	A, tm := f.members[0], tms[0]
	checkFor(t, 10*time.Second, "A sees the fleet unavailable", func() bool { return metric(t, A, "m2mguard_fleet_available") == 0 })
	if code := try(A.b.Addr("tcp"), connect5(t, tm)); code != 0x88 {
		t.Errorf("NATS down: login on A answered %#x, want 0x88 (server unavailable)", code)
	}
	if !strings.Contains(A.logs.String(), "event=fleet_unavailable") || !strings.Contains(A.logs.String(), "reason="+"replay-guard-unavailable") {
		t.Error("NATS down: no fleet_unavailable event, or the refusal's reason is not replay-guard-unavailable")
	}
	list, err := A.api.SessionList(context.Background())
	if err != nil || len(list.Warnings) == 0 {
		t.Errorf("NATS down: the session list has no warning (%v): %+v", err, list)
	}
	t.Logf("cluster down: A saw it and refused a login within %v", time.Since(down).Round(time.Millisecond))
	up := time.Now()
	for i := range nodes {
		restart(i)
	}
	defer func() {
		t.Logf("cluster back: logins resumed on every broker after %v", time.Since(up).Round(time.Millisecond))
	}()
	for _, m := range f.members {
		checkFor(t, 30*time.Second, "logins on "+m.name+" resume once the cluster is back", func() bool { return try(m.b.Addr("tcp"), connect5(t, tm)) == 0 })
	}
}

// TestFleetChangeWorkOncePerFleet: the change work that outlives a
// message runs once per fleet and survives the broker that started it. A
// change started through A for a terminal that is offline expires after
// A is gone, recorded once, by the broker holding the lease; an SMS send
// that A was retrying when it stopped is taken over by one other broker.
func TestFleetChangeWorkOncePerFleet(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	mode := fleetMode(t, 3)
	f := startFleet(t, v, 3, func(i int, cfg *broker.Config) {
		mode(i, cfg)
		// Long enough that A's first failed send leaves time for its retry
		// (the hook waits 5 s, SMSRetry): a send whose next attempt would
		// fall past the deadline ends, and there is nothing to take over.
		// With 6 s, a first attempt later than 1 s after the start (a busy
		// machine) ended the send and failed the test.
		cfg.Keys.ChangeDeadline = 12 * time.Second
		cfg.SMS.URL = gw.URL() + "/send"
		cfg.SMS.Retries = 0
	})
	A, B, C := f.members[0], f.members[1], f.members[2]
	ctx := context.Background()

	// An offline terminal's change, started through A.
	expiring := f.register(t, 0, "ONCEEXPIRE1")
	if _, err := A.api.StartChange(ctx, expiring.SN, "pwd"); err != nil {
		t.Fatal(err)
	}
	// An online terminal without a session key gets its change by SMS;
	// the gateway fails, so A keeps retrying.
	if _, err := A.api.Register(ctx, adminapi.RegisterRequest{SN: "ONCESMS1", IMEI: "354494040518570", IMSI: "460020084678120", MSISDN: "+8613800000001"}); err != nil {
		t.Fatal(err)
	}
	texting, err := A.b.Service().Get(ctx, "ONCESMS1")
	if err != nil {
		t.Fatal(err)
	}
	if _, code := login(t, A, texting, texting.Creds.Up); code != 0 {
		t.Fatalf("login on A: CONNACK %#x", code)
	}
	gw.FailNext(1 << 20)
	ch, err := A.api.StartChange(ctx, texting.SN, "pwd")
	if err != nil || ch.Mode != "sms" {
		t.Fatalf("change by SMS: %+v %v", ch, err)
	}
	checkFor(t, 10*time.Second, "A tried to send the SMS", func() bool { return gw.Sends() > 0 })

	// A goes away; the gateway recovers.
	if err := A.b.Close(); err != nil {
		t.Fatal(err)
	}
	gw.FailNext(0)
	sent := len(gw.Messages())

	// The lease holder among B and C does the work, once.
	rest := []*member{B, C}
	if !testwait.Until(15*time.Second, func() bool {
		for _, m := range rest {
			m.b.FleetLink().SweepChanges()
		}
		return len(gw.Messages()) > sent
	}) {
		t.Fatalf("not within 15 s: the SMS sent again by the broker holding the lease (gateway: %d attempts, %d messages)\nA:\n%s\nB:\n%s\nC:\n%s",
			gw.Sends(), len(gw.Messages()), fleetLines(A.logs.String()), fleetLines(B.logs.String()), fleetLines(C.logs.String()))
	}
	checkFor(t, 10*time.Second, "the change marked delivered", func() bool {
		rec, err := B.b.Service().Get(ctx, texting.SN)
		return err == nil && rec.Pending != nil && rec.Pending.Delivered
	})
	checkFor(t, 15*time.Second, "the change started through A expired, recorded once", func() bool {
		for _, m := range rest {
			m.b.FleetLink().SweepChanges()
			m.b.Hook().ExpireChanges(ctx)
		}
		return strings.Count(B.logs.String()+C.logs.String(), `event=change_expired sn=`+expiring.SN) >= 1
	})
	for _, m := range rest { // a second round finds nothing more
		m.b.FleetLink().SweepChanges()
		m.b.Hook().ExpireChanges(ctx)
	}
	logs := B.logs.String() + C.logs.String()
	if n := strings.Count(logs, `event=change_expired sn=`+expiring.SN); n != 1 {
		t.Errorf("the expiry was recorded %d times, want once", n)
	}
	if n := strings.Count(logs, "event=fleet_sms_taken_over"); n != 1 {
		t.Errorf("the SMS send was taken over %d times, want once", n)
	}
	if rec, err := B.b.Service().Get(ctx, expiring.SN); err != nil || rec.Pending != nil {
		t.Errorf("the expired change is still pending: %v", err)
	}
}

// fleetLines returns the lines of a broker's log about fleet work, leases
// and SMS sends, for a failure message.
func fleetLines(logs string) string {
	var out []string
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "fleet") || strings.Contains(l, "lease") || strings.Contains(l, "sms") || strings.Contains(l, "SMS") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

package fleet

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/internal/freeport"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

// Credentials of the test clusters' client and route listeners.
const (
	testUser      = "m2mguard"
	testPassword  = "nats-test-password-7f3a"
	testRouteUser = "route"
	testRoutePass = "route-test-password-91c2"
)

// testLogger discards everything unless M2MGUARD_FLEET_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("M2MGUARD_FLEET_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// checkFor polls fn until it returns nil, as nats-server's own tests do,
// and fails t with fn's last error if timeout passes first. The pause
// between polls is testwait's back-off; the interval argument is no longer
// used.
func checkFor(t testing.TB, timeout, _ time.Duration, fn func() error) {
	t.Helper()
	var err error
	if !testwait.Until(timeout, func() bool { err = fn(); return err == nil }) {
		t.Fatalf("condition not met within %s: %v", timeout, err)
	}
}

// cluster is a NATS cluster of embedded nodes with JetStream, in the test
// process, on fixed loopback ports so that a node restarts as itself.
type cluster struct {
	t     testing.TB
	opts  []NodeOptions
	nodes []*Node // nil while a node is down
}

// newCluster starts n nodes routed to each other (n = 1: a single node
// without a cluster) and waits until JetStream has a meta leader. mod may
// change each node's options.
func newCluster(t testing.TB, n int, mod func(i int, o *NodeOptions)) *cluster {
	t.Helper()
	c := defineCluster(t, n, mod)
	for i := range n {
		c.start(i)
	}
	c.waitReady()
	return c
}

// defineCluster is newCluster without starting a node: the test starts
// them (start) and waits for them (waitReady).
func defineCluster(t testing.TB, n int, mod func(i int, o *NodeOptions)) *cluster {
	t.Helper()
	ports := freeport.Ports(t, 2*n)
	c := &cluster{t: t, opts: make([]NodeOptions, n), nodes: make([]*Node, n)}
	var routes []string
	if n > 1 {
		for i := range n {
			routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[n+i]))
		}
	}
	dir := t.TempDir()
	for i := range n {
		o := NodeOptions{
			Name:          fmt.Sprintf("n%d", i+1),
			StoreDir:      filepath.Join(dir, fmt.Sprintf("n%d", i+1)),
			Port:          ports[i],
			Users:         []NodeUser{{Name: testUser, Password: []byte(testPassword)}},
			ReadyTimeout:  10 * time.Second,
			Logger:        testLogger(),
			MaxStore:      256 << 20,
			RouteUser:     testRouteUser,
			RoutePassword: []byte(testRoutePass),
		}
		if n > 1 {
			o.ClusterName = "m2mguard-test"
			o.ClusterPort = ports[n+i]
			o.Routes = routes
		}
		if mod != nil {
			mod(i, &o)
		}
		c.opts[i] = o
	}
	t.Cleanup(c.shutdown)
	return c
}

func (c *cluster) start(i int) {
	c.t.Helper()
	n, err := StartNode(c.opts[i])
	if err != nil {
		c.t.Fatal(err)
	}
	c.nodes[i] = n
}

// stop shuts node i down (as a crash would, for JetStream: its files stay).
func (c *cluster) stop(i int) {
	if c.nodes[i] != nil {
		c.nodes[i].Shutdown()
		c.nodes[i] = nil
	}
}

// restart starts node i again on its ports and store and waits until the
// cluster is ready.
func (c *cluster) restart(i int) {
	c.t.Helper()
	c.stop(i)
	c.start(i)
	c.waitReady()
}

func (c *cluster) shutdown() {
	for i := range c.nodes {
		c.stop(i)
	}
}

// waitReady waits until every running node sees a JetStream meta leader.
func (c *cluster) waitReady() {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, n := range c.nodes {
		if n == nil {
			continue
		}
		if err := n.WaitJetStream(ctx); err != nil {
			c.t.Fatal(err)
		}
	}
}

// url is node i's client URL (valid while it is down too: fixed ports).
func (c *cluster) url(i int) string { return fmt.Sprintf("nats://127.0.0.1:%d", c.opts[i].Port) }

// urls are the client URLs, node first's first.
func (c *cluster) urls(first int) []string {
	out := []string{c.url(first)}
	for i := range c.opts {
		if i != first {
			out = append(out, c.url(i))
		}
	}
	return out
}

// streamLeader is the index of the node leading stream, -1 if none.
func (c *cluster) streamLeader(stream string) int {
	for i, n := range c.nodes {
		if n != nil && n.IsStreamLeader(stream) {
			return i
		}
	}
	return -1
}

// metaLeader is the index of the node leading the meta group, -1 if none.
func (c *cluster) metaLeader() int {
	for i, n := range c.nodes {
		if n != nil && n.IsMetaLeader() {
			return i
		}
	}
	return -1
}

// testOptions are the options of a broker connected to node i first.
func (c *cluster) testOptions(id string, node int) Options {
	return Options{
		URLs:           c.urls(node),
		BrokerID:       id,
		User:           testUser,
		Password:       []byte(testPassword),
		Logger:         testLogger(),
		Registerer:     prometheus.NewRegistry(),
		Heartbeat:      250 * time.Millisecond,
		SweepEvery:     -1,
		RequestTimeout: 2 * time.Second,
	}
}

// open opens a broker's fleet connected to node i first, closed at the
// end of the test.
func (c *cluster) open(id string, node int, mod func(*Options)) *Fleet {
	c.t.Helper()
	o := c.testOptions(id, node)
	if mod != nil {
		mod(&o)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	f, err := Open(ctx, o)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { _ = f.Close() })
	return f
}

// TestClusterStarts is the harness's own check: three nodes form one
// JetStream cluster and a broker gets three replicas.
func TestClusterStarts(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	f := c.open("a", 0, nil)
	if f.Replicas() != 3 {
		t.Fatalf("replicas = %d, want 3", f.Replicas())
	}
	if c.metaLeader() < 0 {
		t.Fatal("no meta leader")
	}
	one := newCluster(t, 1, nil)
	g := one.open("b", 0, nil)
	if g.Replicas() != 1 {
		t.Fatalf("single node: replicas = %d, want 1", g.Replicas())
	}
}

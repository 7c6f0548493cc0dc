package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/fleetlink"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/stats"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Fleet mode in the benchmark (README, "Fleet mode"): the hook broker's replay
// claims, throttle, session directory and change book on NATS JetStream,
// wired as broker.Start wires them, against a NATS cluster of three nodes
// in a process of its own (`m2m-bench nats`), so that the broker's CPU and
// the cluster's are measured apart.

// envNATSPassword passes the NATS password to the child processes.
const envNATSPassword = "M2MBENCH_NATS_PASSWORD"

// natsUser is the user of the benchmark's NATS cluster.
const natsUser = "m2m-bench"

// benchFleet is a benchmark broker's part in a fleet.
type benchFleet struct {
	f      *fleet.Fleet
	link   *fleetlink.Link
	claims *claimTimer
}

// openFleet joins the fleet of cfg.NATSURLs. Its link's OnWrite goes into
// the key service's options, the rest into the hook's (wire).
func openFleet(ctx context.Context, cfg BrokerConfig) (*benchFleet, error) {
	quiet := slog.New(slog.DiscardHandler)
	f, err := fleet.Open(ctx, fleet.Options{URLs: cfg.NATSURLs, BrokerID: cfg.BrokerID,
		User: natsUser, Password: []byte(cfg.NATSPassword), Logger: quiet})
	if err != nil {
		return nil, fmt.Errorf("fleet: %w", err)
	}
	link, err := fleetlink.New(ctx, fleetlink.Options{Fleet: f, Logger: quiet})
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("fleet: %w", err)
	}
	return &benchFleet{f: f, link: link, claims: &claimTimer{g: f}}, nil
}

// wire sets the hook's fleet options as broker.Start does, with the claims
// timed.
func (bf *benchFleet) wire(o *hook.Options) {
	o.ReplayGuard = bf.claims
	o.Throttler = bf.f.Throttler(hook.NewThrottleTable(hook.DefaultOptions().Throttle))
	o.Directory, o.ChangeBook = bf.link.Directory(), bf.link.ChangeBook()
	o.ClaimTimeout = 3 * time.Second
}

// attach starts the link once the hook exists and waits for its first
// read of the directory, which drops the key service's cache: the suite
// warms the cache after it, as for a single broker.
func (bf *benchFleet) attach(ctx context.Context, h *hook.Hook, svc *keysvc.Service) error {
	if err := bf.link.Attach(h, svc); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return bf.link.WaitSynced(ctx)
}

// close leaves the fleet.
func (bf *benchFleet) close() {
	bf.link.Close()
	bf.f.Close()
}

// claimTimer times every replay claim of the hook.
type claimTimer struct {
	g  hook.ReplayGuard
	mu sync.Mutex
	ds []time.Duration
}

// Claim is hook.ReplayGuard.
func (c *claimTimer) Claim(ctx context.Context, sn string, nonce uint64, until time.Time) (bool, error) {
	start := time.Now()
	ok, err := c.g.Claim(ctx, sn, nonce, until)
	d := time.Since(start)
	c.mu.Lock()
	c.ds = append(c.ds, d)
	c.mu.Unlock()
	return ok, err
}

// take returns the latencies of the claims since the last take.
func (c *claimTimer) take() stats.Latency {
	c.mu.Lock()
	ds := c.ds
	c.ds = nil
	c.mu.Unlock()
	return stats.Summarize(ds)
}

// cmdNATS runs the benchmark's NATS cluster: nodes with JetStream, routed
// to each other, on loopback, in this one process.
func cmdNATS(ctx context.Context, args []string, in io.Reader, out io.Writer) error {
	fs := newFlags("nats", "Runs a NATS cluster with JetStream (the fleet of fleet-mode brokers) on loopback until stdin\n"+
		"closes or SIGTERM. Clients authenticate as user "+natsUser+" with the password in $"+envNATSPassword+".\n"+
		"Prints {\"urls\":[...]} on stdout once JetStream answers; then answers `cpu` on stdin as serve does.")
	nodes := fs.Int("nodes", 3, "nodes")
	dir := fs.String("dir", "", "JetStream files (default: a temporary directory, removed at exit)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	password := os.Getenv(envNATSPassword)
	if password == "" {
		return errors.New("$" + envNATSPassword + " is empty")
	}
	if *dir == "" {
		d, err := os.MkdirTemp("", "m2m-bench-nats-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		*dir = d
	}
	ports, err := loopbackPorts(2 * *nodes)
	if err != nil {
		return err
	}
	var routes []string
	for i := range *nodes {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[*nodes+i]))
	}
	quiet := slog.New(slog.DiscardHandler)
	var urls []string
	var started []*fleet.Node
	defer func() {
		for _, n := range started {
			n.Shutdown()
		}
	}()
	for i := range *nodes {
		n, err := fleet.StartNode(fleet.NodeOptions{Name: fmt.Sprintf("nats%d", i+1), StoreDir: filepath.Join(*dir, fmt.Sprint(i+1)),
			Port: ports[i], ClusterName: "m2m-bench", ClusterPort: ports[*nodes+i], Routes: routes,
			Users: []fleet.NodeUser{{Name: natsUser, Password: []byte(password)}}, Logger: quiet})
		if err != nil {
			return err
		}
		started = append(started, n)
		urls = append(urls, n.ClientURL())
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for _, n := range started {
		if err := n.WaitJetStream(wctx); err != nil {
			return fmt.Errorf("JetStream: %w", err)
		}
	}
	enc := json.NewEncoder(out)
	enc.Encode(map[string][]string{"urls": urls})
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		switch strings.TrimSpace(sc.Text()) {
		case "cpu":
			enc.Encode(cpuReport())
		default:
			enc.Encode(map[string]string{"error": "unknown command"})
		}
	}
	return nil
}

// loopbackPorts returns n free ports on loopback.
func loopbackPorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// natsChild is the suite's NATS cluster, a child process (`m2m-bench
// nats`).
type natsChild struct {
	*child
	urls []string
}

// startNATS starts the cluster; env carries its password.
func startNATS(ctx context.Context, env []string) (*natsChild, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, exe, "nats")
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &natsChild{child: &child{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}}
	var hello struct{ URLs []string }
	if err := c.read(&hello); err != nil {
		c.stop()
		return nil, fmt.Errorf("nats child: %w", err)
	}
	c.urls = hello.URLs
	return c, nil
}

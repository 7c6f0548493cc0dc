package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/m2mguard/m2mguard/internal/stats"
	"github.com/m2mguard/m2mguard/keysvc"
)

// The reconnect storm: an idle fleet, the broker restarted, everyone
// reconnecting at once. For each mode (allow-all, the hook on the
// embedded store, the hook on Vault), in one run and interleaved over the
// rounds: a broker child (`serve`), N terminals connected from load
// children (`storm-load`) and left idle, the broker's memory read, the
// broker killed (SIGKILL) and started again on the same port and data
// with a cold key-service cache, and every terminal re-dialled at once.

// selfEnv is added to the environment of every child this process starts
// (the tests set the variable that makes the test binary run main).
var selfEnv []string

// brokerFDReserve is what a broker process holds besides its terminals'
// connections: listener, store, Vault and NATS connections, pipes.
// loadFDReserve is the same for a load generator.
const (
	brokerFDReserve = 200
	loadFDReserve   = 50
)

// stormModes are the storm's broker set-ups.
var stormModes = []Scenario{
	{Name: "allow", Broker: "mochi + auth.AllowHook; bare paho clients, no credentials", Mode: "allow", Kind: "plain"},
	{Name: "bolt", Broker: "mochi + m2mguard hook, embedded store, cold cache; bare paho clients with an M2M1 login and a session key (wait for the key message)", Mode: "hook", Store: "bolt", Kind: "m2m1", SessionKey: true},
	{Name: "vault", Broker: "mochi + m2mguard hook, Vault, cold cache; bare paho clients with an M2M1 login and a session key (wait for the key message)", Mode: "hook", Store: "vault", Kind: "m2m1", SessionKey: true},
}

// StormSettings are the knobs of a storm run.
type StormSettings struct {
	N                  int        `json:"n"`
	Sources            int        `json:"sources"`
	Loaders            int        `json:"load_processes"`
	Rounds             int        `json:"rounds"`
	ConnectConcurrency int        `json:"connect_concurrency"` // attempts in flight in the first connect
	StormConcurrency   int        `json:"storm_concurrency"`   // in the storm; 0 = every terminal at once
	Idle               string     `json:"idle"`
	Deadline           string     `json:"deadline"` // per phase: terminals not connected by then count as never
	AttemptTimeout     string     `json:"attempt_timeout"`
	Outage             bool       `json:"outage_storm"`
	CacheTTL           string     `json:"cache_ttl"`
	StoreTimeout       string     `json:"store_timeout,omitempty"` // the hook's, per key-service call; "" = its default
	WritesPending      int        `json:"mochi_max_client_writes_pending"`
	NetBuf             int        `json:"mochi_client_net_buffers"`
	GOGC               string     `json:"gogc"`
	GOMEMLIMIT         string     `json:"gomemlimit"`
	NoFile             uint64     `json:"rlimit_nofile"`
	PortRange          string     `json:"ephemeral_port_range"`
	Modes              []Scenario `json:"modes"`
}

// StormPhase summarises one phase of one mode over all load processes.
type StormPhase struct {
	Terminals      int           `json:"terminals"`
	Connected      int           `json:"connected"`
	Never          int           `json:"never"`
	FailedAttempts int           `json:"failed_attempts"`
	Seconds        float64       `json:"seconds"`          // until the last terminal was connected
	LoadCPU        float64       `json:"load_cpu_seconds"` // CPU of the load processes in the phase
	PerSec         float64       `json:"connects_per_sec"` // connected / seconds
	Login          stats.Latency `json:"login"`            // one successful attempt: TCP connect to ready
	Ready          stats.Latency `json:"ready"`            // start of the phase to ready, retries included
	Errors         []string      `json:"errors,omitempty"`
}

func summarizePhase(p PhaseResult) StormPhase {
	toDur := func(ms []float64) []time.Duration {
		ds := make([]time.Duration, len(ms))
		for i, m := range ms {
			ds[i] = time.Duration(m * float64(time.Millisecond))
		}
		return ds
	}
	s := StormPhase{Terminals: p.Terminals, Connected: p.Connected, Never: p.Never, FailedAttempts: p.FailedAttempts,
		Seconds: p.Seconds, LoadCPU: p.CPUSeconds, Login: stats.Summarize(toDur(p.LoginMS)), Ready: stats.Summarize(toDur(p.ReadyMS)), Errors: p.Errors}
	if p.Seconds > 0 {
		s.PerSec = float64(p.Connected) / p.Seconds
	}
	return s
}

// StormStore is what the key store saw in the storm (hook modes): every
// keysvc cache miss is one read of the store.
type StormStore struct {
	Reads     uint64 `json:"reads"`      // store reads (keysvc cache misses)
	Hits      uint64 `json:"cache_hits"` // lookups the cache answered
	Coalesced uint64 `json:"coalesced"`  // lookups that shared another's read
	// ReadsPerSec is Reads over the storm's duration; PeakReadsPerSec
	// the most in one second of the broker's cache counters, read every
	// second.
	ReadsPerSec     float64  `json:"reads_per_sec"`
	PeakReadsPerSec float64  `json:"peak_reads_per_sec"`
	PerSecond       []uint64 `json:"reads_each_second"`
	Stale           uint64   `json:"stale"`       // served stale: the store failed
	FailClosed      uint64   `json:"fail_closed"` // refused: the store failed, nothing cached
}

// StormRun is one mode in one round.
type StormRun struct {
	Mode  string     `json:"mode"`
	Round int        `json:"round"`
	First StormPhase `json:"first_connect"`
	// The first broker before any terminal, with every terminal
	// connected and idle; the restarted broker before the storm and after it.
	MemBase       MemReport `json:"mem_before"`
	MemIdle       MemReport `json:"mem_idle"`
	MemStormBase  MemReport `json:"mem_restarted"`
	MemAfterStorm MemReport `json:"mem_after_storm"`
	HeapPerTerm   float64   `json:"heap_per_terminal_bytes"` // idle, (HeapAlloc idle - before) / connected
	RSSPerTerm    float64   `json:"rss_per_terminal_bytes"`  // idle, (RSS idle - before) / connected
	// RSSPerTermAfter is the restarted broker's RSS growth per terminal
	// after the storm: the storm's peak buffers included.
	RSSPerTermAfter float64 `json:"rss_per_terminal_after_storm_bytes"`
	LostSeconds     float64 `json:"lost_seconds"`           // from the kill until every load process saw all its connections closed
	RestartSeconds  float64 `json:"broker_restart_seconds"` // start of the new child until it listened
	BrokerStartCPU  float64 `json:"broker_start_cpu_seconds"`
	// Restart is the storm after the restart: a cold cache.
	Restart StormOutcome `json:"restart_storm"`
	// Outage (--outage) is a second storm on the same broker: every
	// terminal's connection cut by the load processes (a network outage),
	// the broker and its warm cache still up.
	Outage *StormOutcome `json:"outage_storm,omitempty"`
}

// StormOutcome is one storm of one mode.
type StormOutcome struct {
	Clients        StormPhase  `json:"clients"`
	BrokerCPU      float64     `json:"broker_cpu_seconds"`        // during the storm
	BrokerCPUPer   float64     `json:"broker_cpu_us_per_connect"` // BrokerCPU per connected terminal
	BrokerCPUShare float64     `json:"broker_cpu_cores"`          // BrokerCPU / storm seconds
	Store          *StormStore `json:"store,omitempty"`           // hook modes
	WallClock      float64     `json:"wall_clock_seconds"`        // the commands sent to the last answer
	// PeakFDs is the most open descriptors the broker had at one of its
	// readings, every second of the storm (its limit: Settings.NoFile).
	PeakFDs int `json:"broker_peak_fds"`
}

// StormRatio compares a hook mode with allow-all in one round.
type StormRatio struct {
	Mode  string  `json:"mode"`
	Storm string  `json:"storm"` // restart or outage
	Round int     `json:"round"`
	Rate  float64 `json:"rate_ratio"` // (N / seconds until all connected) hook / allow-all
	// Capacity is (connects per broker CPU-second) hook / allow-all: the
	// rate ratio where the broker, not the shared machine, runs out of CPU.
	Capacity float64 `json:"capacity_ratio"`
	// ExtraFailed is the hook's failed attempts plus never-connected
	// terminals beyond allow-all's (target 0).
	ExtraFailed int  `json:"extra_failed"`
	Met         bool `json:"met"` // Rate >= 0.9 and ExtraFailed <= 0
}

// StormResult is the JSON result of `m2m-bench storm`.
type StormResult struct {
	Command  string        `json:"command"`
	Started  time.Time     `json:"started"`
	Machine  Machine       `json:"machine"`
	Load     string        `json:"load_average,omitempty"` // /proc/loadavg at the start and the end
	Settings StormSettings `json:"settings"`
	Runs     []StormRun    `json:"runs"`
	Ratios   []StormRatio  `json:"ratios"`
}

// fileLimit returns the open-file limit this process (and its children)
// run with, after raiseFileLimit.
func fileLimit() uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0
	}
	return rl.Cur
}

// portRange reads the kernel's ephemeral port range.
func portRange() (lo, hi int) {
	data, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768, 60999 // Linux's default
	}
	if _, err := fmt.Sscan(string(data), &lo, &hi); err != nil || hi < lo {
		return 32768, 60999
	}
	return lo, hi
}

// errLimit says that the machine's limits do not allow the run asked for.
var errLimit = errors.New("N exceeds this machine's limits")

// checkStormLimits says, before anything starts, whether n terminals fit
// this machine's limits: a broker process holds one descriptor per
// terminal, a load process one per terminal it drives, and one source
// address gives one ephemeral port range towards the broker's port.
func checkStormLimits(n, loaders, sources int, nofile uint64, portLo, portHi int) error {
	if n <= 0 || loaders <= 0 || sources <= 0 {
		return fmt.Errorf("storm: --n, --loaders and --sources must be positive")
	}
	if sources > 254 {
		return fmt.Errorf("storm: --sources %d: at most 254 (127.0.0.1 ... 127.0.0.254)", sources)
	}
	if err := checkBrokerFiles(n, nofile); err != nil {
		return err
	}
	// A load process holds N/loaders connections and fewer other files
	// than a broker: if the broker fits, so does each load process.
	// --loaders spreads the clients' CPU and garbage collection instead.
	ports := portHi - portLo + 1
	usable := ports - ports/10 // room for sockets of other programs and TIME_WAIT
	if per := (n + sources - 1) / sources; per > usable {
		return fmt.Errorf("%w: --n %d from --sources %d puts %d connections on each source address, "+
			"more than its ephemeral ports allow (%d..%d, %d usable): use --sources %d or more",
			errLimit, n, sources, per, portLo, portHi, usable, (n+usable-1)/usable)
	}
	return nil
}

// checkLoadFiles says whether a load generator (run, storm-load) can
// hold n client connections under the open-file limit nofile.
func checkLoadFiles(n int, nofile uint64) error {
	if need := uint64(n + loadFDReserve); need > nofile {
		return fmt.Errorf("%w: %d clients need about %d open files in this load process, but RLIMIT_NOFILE is %d here "+
			"(already raised to the hard limit): split them over processes (storm --loaders), or raise the hard limit "+
			"(`ulimit -Hn %d` as root, with CAP_SYS_RESOURCE)", errLimit, n, need, nofile, need)
	}
	return nil
}

// checkBrokerFiles says whether a broker process can hold n terminals
// under the open-file limit nofile.
func checkBrokerFiles(n int, nofile uint64) error {
	if need := uint64(n + brokerFDReserve); need > nofile {
		return fmt.Errorf("%w: --n %d needs about %d open files in the broker process (one per terminal + %d), "+
			"but RLIMIT_NOFILE is %d here (m2m-bench already raised the soft limit to the hard one), so at most --n %d fits; "+
			"raise the hard limit before starting m2m-bench: `ulimit -Hn %d; ulimit -Sn %d` as root (it needs CAP_SYS_RESOURCE, "+
			"which a container may lack, and fs.nr_open at least that), LimitNOFILE= in a systemd unit, "+
			"`docker run --ulimit nofile=%d:%d`, or nofile in /etc/security/limits.conf",
			errLimit, n, need, brokerFDReserve, nofile, max(0, int(nofile)-brokerFDReserve), need, need, need, need)
	}
	return nil
}

func cmdStorm(ctx context.Context, args []string) error {
	fs := newFlags("storm", "The reconnect storm: for each mode (allow-all; the hook on the embedded store; the hook on Vault),\n"+
		"in one run, interleaved over the rounds: start a broker child, connect N bare paho terminals from\n"+
		"--loaders load processes dialling from --sources addresses 127.0.0.1...127.0.0.k, leave them idle,\n"+
		"read the broker's memory, kill the broker (SIGKILL), start it again on the same port and data\n"+
		"(with a cold key-service cache), and re-dial every terminal at once. Reports the time until all\n"+
		"are connected, login latency in the storm, failed attempts, terminals never connected, broker\n"+
		"CPU, RSS and heap per terminal and the store reads of the storm. Fails at once when N does not\n"+
		"fit the open-file limit or the ephemeral ports. Writes --json and a section of --md.")
	s := StormSettings{}
	fs.IntVar(&s.N, "n", 1000, "terminals")
	fs.IntVar(&s.Sources, "sources", 4, "source addresses 127.0.0.1 ... 127.0.0.k the terminals dial from")
	fs.IntVar(&s.Loaders, "loaders", 1, "load processes, each driving N/loaders terminals")
	fs.IntVar(&s.Rounds, "rounds", 1, "rounds; each runs every mode once, in a rotated order")
	fs.IntVar(&s.ConnectConcurrency, "concurrency", 256, "attempts in flight while the fleet first connects")
	fs.IntVar(&s.StormConcurrency, "storm-concurrency", 0, "attempts in flight in the storm (0: every terminal at once)")
	idle := fs.Duration("idle", 10*time.Second, "idle time between the first connect and the memory reading")
	attempt := fs.Duration("attempt-timeout", 30*time.Second, "a terminal's TCP connect timeout, and its CONNACK timeout (paho's ConnectTimeout), per attempt")
	deadline := fs.Duration("deadline", 3*time.Minute, "per phase: a terminal not connected by then counts as never connected")
	fs.IntVar(&s.WritesPending, "writes-pending", 256, "mochi Capabilities.MaximumClientWritesPending, every broker")
	fs.IntVar(&s.NetBuf, "netbuf", 2048, "mochi client read and write buffer sizes, every broker")
	fs.StringVar(&s.GOGC, "gogc", "100", "GOGC of every child process")
	fs.StringVar(&s.GOMEMLIMIT, "gomemlimit", "off", "GOMEMLIMIT of every child process")
	fs.BoolVar(&s.Outage, "outage", true, "after the restart storm, a second one: every connection cut by the load processes, the broker and its warm cache up")
	cacheTTL := fs.Duration("cache-ttl", 5*time.Minute, "keysvc read cache TTL of the brokers (keysvc's default is 30s: a record older than that is read again)")
	storeTimeout := fs.Duration("store-timeout", 0, "the hook's timeout of one key-service call during a login (auth.store_timeout; 0 = its default, 2s)")
	modes := fs.String("modes", "allow,bolt,vault", "modes to run (comma-separated: allow, bolt, vault)")
	mdPath := fs.String("md", "BENCHMARKS.md", "Markdown report whose storm section to write or replace (empty: none)")
	jsonPath := fs.String("json", "", "JSON result file (empty: stdout)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	s.Idle, s.Deadline, s.CacheTTL, s.AttemptTimeout = idle.String(), deadline.String(), cacheTTL.String(), attempt.String()
	if *storeTimeout > 0 {
		s.StoreTimeout = storeTimeout.String()
	}
	for _, name := range strings.Split(*modes, ",") {
		found := false
		for _, m := range stormModes {
			if m.Name == strings.TrimSpace(name) {
				s.Modes = append(s.Modes, m)
				found = true
			}
		}
		if !found {
			return fmt.Errorf("unknown mode %q (allow, bolt, vault)", name)
		}
	}
	s.NoFile = fileLimit()
	lo, hi := portRange()
	s.PortRange = fmt.Sprintf("%d-%d", lo, hi)
	if err := checkStormLimits(s.N, s.Loaders, s.Sources, s.NoFile, lo, hi); err != nil {
		return err
	}
	res := &StormResult{Command: "go run ./cmd/m2m-bench storm " + strings.Join(args, " "), Started: time.Now().UTC(),
		Machine: machine(), Settings: s}
	if err := runStorm(ctx, res, *idle, *deadline); err != nil {
		return err
	}
	if *mdPath != "" {
		if err := writeStormMarkdown(*mdPath, res); err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, "wrote the storm section of", *mdPath)
	}
	return writeJSON(*jsonPath, res)
}

func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// runStorm provisions the stores and runs every mode in every round.
func runStorm(ctx context.Context, res *StormResult, idle, deadline time.Duration) error {
	s := res.Settings
	load0 := loadAverage()
	dir, err := os.MkdirTemp("", "m2m-bench-storm-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	need := map[string]bool{}
	for _, m := range s.Modes {
		need[m.Store] = true
	}
	stores, err := provisionStores(ctx, dir, s.N, need["bolt"], need["vault"])
	if err != nil {
		return err
	}
	defer stores.stop()
	csvPath := filepath.Join(dir, "terminals.csv") // the storm-load children's terminals
	if err := os.WriteFile(csvPath, stores.csv, 0o600); err != nil {
		return err
	}
	env := append([]string{"GOGC=" + s.GOGC, "GOMEMLIMIT=" + s.GOMEMLIMIT}, stores.env...)
	boltPath, vaultAddr := stores.boltPath, stores.vaultAddr
	sp := stormPlan{s: s, env: env, csvPath: csvPath, boltPath: boltPath, vaultAddr: vaultAddr, idle: idle, deadline: deadline}
	for r := range s.Rounds {
		n := len(s.Modes)
		for i := range n {
			m := s.Modes[(i+r)%n]
			logf("round %d/%d: %s", r+1, s.Rounds, m.Name)
			run, err := sp.run(ctx, m)
			if err != nil {
				return fmt.Errorf("round %d %s: %w", r+1, m.Name, err)
			}
			run.Round = r + 1
			res.Runs = append(res.Runs, *run)
		}
	}
	res.Ratios = stormRatios(res.Runs)
	res.Load = load0 + " at the start, " + loadAverage() + " at the end"
	return nil
}

// stormPlan is what every mode's run needs.
type stormPlan struct {
	s                            StormSettings
	env                          []string
	csvPath, boltPath, vaultAddr string
	idle, deadline               time.Duration
}

// broker starts a broker child for m listening on listen, with a cold
// cache (no prewarm: a restarted broker has none).
func (sp *stormPlan) broker(ctx context.Context, m Scenario, listen string) (*child, error) {
	ss := SuiteSettings{WritesPending: sp.s.WritesPending, NetBuf: sp.s.NetBuf}
	args := []string{"--listen", listen, "--prewarm=false", "--cache-ttl", sp.s.CacheTTL}
	if sp.s.StoreTimeout != "" && m.Mode == "hook" {
		args = append(args, "--store-timeout", sp.s.StoreTimeout)
	}
	return startChild(ctx, m, 0, ss, sp.env, sp.boltPath, sp.vaultAddr, nil, args...)
}

// loaders starts the load processes for the broker at addr.
func (sp *stormPlan) loaders(ctx context.Context, m Scenario, addr string) ([]*child, error) {
	var ls []*child
	per := (sp.s.N + sp.s.Loaders - 1) / sp.s.Loaders
	for from := 0; from < sp.s.N; from += per {
		c, err := startProc(ctx, sp.env, "storm-load", "--addr", addr, "--terminals", sp.csvPath,
			"--from", fmt.Sprint(from), "--count", fmt.Sprint(min(per, sp.s.N-from)),
			"--sources", loopbackSources(sp.s.Sources), "--kind", m.Kind, "--attempt-timeout", sp.s.AttemptTimeout, fmt.Sprintf("--session-key=%v", m.SessionKey))
		if err == nil {
			var hello struct{ Terminals int }
			if err = c.read(&hello); err != nil {
				c.stop()
			}
		}
		if err != nil {
			for _, l := range ls {
				l.stop()
			}
			return nil, fmt.Errorf("load process: %w", err)
		}
		ls = append(ls, c)
	}
	return ls, nil
}

// phase sends "connect C D" to every load process at once and merges the
// answers; C is split between them (0 stays 0: all at once).
func phase(ls []*child, concurrency int, deadline time.Duration) (PhaseResult, float64, error) {
	per := concurrency
	if per > 0 {
		per = max(1, concurrency/len(ls))
	}
	results := make([]PhaseResult, len(ls))
	errs := make([]error, len(ls))
	var wg sync.WaitGroup
	start := time.Now()
	for i, l := range ls {
		wg.Go(func() {
			var a struct {
				PhaseResult
				Error string `json:"error"`
			}
			errs[i] = l.ask(fmt.Sprintf("connect %d %s", per, deadline), &a)
			if errs[i] == nil && a.Error != "" {
				errs[i] = errors.New(a.Error)
			}
			results[i] = a.PhaseResult
		})
	}
	wg.Wait()
	wall := time.Since(start).Seconds()
	var all PhaseResult
	for _, r := range results {
		all.merge(r)
	}
	return all, wall, errors.Join(errs...)
}

// run is one mode's run: first connect, idle, kill, restart, storm.
func (sp *stormPlan) run(ctx context.Context, m Scenario) (*StormRun, error) {
	run := &StormRun{Mode: m.Name}
	b, err := sp.broker(ctx, m, "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	killed := false
	defer func() {
		if !killed {
			b.stop()
		}
	}()
	addr := b.addr
	if err := b.ask("mem", &run.MemBase); err != nil {
		return nil, err
	}
	ls, err := sp.loaders(ctx, m, addr)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, l := range ls {
			l.stop()
		}
	}()

	// 1. The fleet connects, a bounded number at a time, and idles.
	first, _, err := phase(ls, sp.s.ConnectConcurrency, sp.deadline)
	if err != nil {
		return nil, fmt.Errorf("first connect: %w", err)
	}
	run.First = summarizePhase(first)
	logf("%s: first connect: %d/%d in %.1fs, %d failed attempts", m.Name, first.Connected, first.Terminals, first.Seconds, first.FailedAttempts)
	if first.Connected == 0 {
		return nil, fmt.Errorf("first connect: no terminal connected: %v", first.Errors)
	}
	select {
	case <-time.After(sp.idle):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if err := b.ask("mem", &run.MemIdle); err != nil {
		return nil, err
	}
	n := float64(first.Connected)
	run.HeapPerTerm = (float64(run.MemIdle.HeapAlloc) - float64(run.MemBase.HeapAlloc)) / n
	run.RSSPerTerm = (float64(run.MemIdle.RSS) - float64(run.MemBase.RSS)) / n
	logf("%s: idle with %d clients: RSS %.0f MiB, %.0f B RSS and %.0f B heap per terminal", m.Name, run.MemIdle.Clients,
		float64(run.MemIdle.RSS)/(1<<20), run.RSSPerTerm, run.HeapPerTerm)

	// 2. The broker dies; every terminal sees its connection close.
	t0 := time.Now()
	killed = true
	if err := b.kill(); err != nil {
		return nil, fmt.Errorf("kill the broker: %w", err)
	}
	if err := waitClosed(ctx, ls); err != nil {
		return nil, fmt.Errorf("after the kill: %w", err)
	}
	run.LostSeconds = time.Since(t0).Seconds()

	// 3. The broker comes back on the same port and data, cache cold.
	t1 := time.Now()
	b, err = sp.broker(ctx, m, addr)
	if err != nil {
		return nil, fmt.Errorf("restart: %w", err)
	}
	killed = false
	run.RestartSeconds = time.Since(t1).Seconds()
	var cpu0 CPUReport
	if err := errors.Join(b.ask("mem", &run.MemStormBase), b.ask("cpu", &cpu0)); err != nil {
		return nil, err
	}
	run.BrokerStartCPU = float64(cpu0.CPUNs) / 1e9

	// 4. Everyone at once, the cache cold.
	if run.Restart, err = sp.storm(b, ls, m, "restart"); err != nil {
		return nil, err
	}
	if err := b.ask("mem", &run.MemAfterStorm); err != nil {
		return nil, err
	}
	if c := run.Restart.Clients.Connected; c > 0 {
		run.RSSPerTermAfter = (float64(run.MemAfterStorm.RSS) - float64(run.MemStormBase.RSS)) / float64(c)
	}
	if !sp.s.Outage {
		return run, nil
	}

	// 5. A network outage: every connection cut, the broker up, its
	// cache warm; everyone at once again.
	for _, l := range ls {
		if err := l.do("drop"); err != nil {
			return nil, fmt.Errorf("drop: %w", err)
		}
	}
	if err := waitClosed(ctx, ls); err != nil {
		return nil, fmt.Errorf("after the cut: %w", err)
	}
	t2 := time.Now()
	for {
		var mem MemReport
		if err := b.ask("mem", &mem); err != nil {
			return nil, err
		}
		if mem.Clients <= run.MemStormBase.Clients {
			break
		}
		if time.Since(t2) > time.Minute {
			return nil, fmt.Errorf("the broker still has %d clients a minute after every connection was cut", mem.Clients)
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	o, err := sp.storm(b, ls, m, "outage")
	if err != nil {
		return nil, err
	}
	run.Outage = &o
	return run, nil
}

// waitClosed waits until no load process has a connection open.
func waitClosed(ctx context.Context, ls []*child) error {
	t0 := time.Now()
	for {
		open := 0
		for _, l := range ls {
			var a struct{ Open int }
			if err := l.ask("open", &a); err != nil {
				return err
			}
			open += a.Open
		}
		if open == 0 {
			return nil
		}
		if time.Since(t0) > time.Minute {
			return fmt.Errorf("%d connections still open after a minute", open)
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// storm re-dials every terminal of ls at once against the broker b and
// reads b's CPU time and cache counters around it (every second, too).
func (sp *stormPlan) storm(b *child, ls []*child, m Scenario, name string) (StormOutcome, error) {
	var out StormOutcome
	var cpu0, cpu1 CPUReport
	var cache0, cache1 keysvc.CacheStats
	if err := errors.Join(b.ask("cpu", &cpu0), b.ask("cache", &cache0)); err != nil {
		return out, err
	}
	stopPoll := make(chan struct{})
	var perSec []uint64
	var pollErr error
	var pollWG sync.WaitGroup
	pollWG.Go(func() {
		tk := time.NewTicker(time.Second)
		defer tk.Stop()
		last := cache0.Misses
		for {
			select {
			case <-tk.C:
				var f struct{ FDs int }
				if pollErr = b.ask("fds", &f); pollErr != nil {
					return
				}
				out.PeakFDs = max(out.PeakFDs, f.FDs)
				if m.Mode != "hook" {
					continue
				}
				var c keysvc.CacheStats
				if pollErr = b.ask("cache", &c); pollErr != nil {
					return
				}
				perSec = append(perSec, c.Misses-last)
				last = c.Misses
			case <-stopPoll:
				return
			}
		}
	})
	storm, wall, err := phase(ls, sp.s.StormConcurrency, sp.deadline)
	close(stopPoll)
	pollWG.Wait()
	if err = errors.Join(err, pollErr); err != nil {
		return out, fmt.Errorf("%s storm: %w", name, err)
	}
	var fds struct{ FDs int }
	if err := errors.Join(b.ask("cpu", &cpu1), b.ask("cache", &cache1), b.ask("fds", &fds)); err != nil {
		return out, err
	}
	out.PeakFDs = max(out.PeakFDs, fds.FDs)
	out.Clients = summarizePhase(storm)
	out.WallClock = wall
	out.BrokerCPU = float64(cpu1.CPUNs-cpu0.CPUNs) / 1e9
	if storm.Connected > 0 {
		out.BrokerCPUPer = out.BrokerCPU * 1e6 / float64(storm.Connected)
	}
	if storm.Seconds > 0 {
		out.BrokerCPUShare = out.BrokerCPU / storm.Seconds
	}
	if m.Mode == "hook" {
		st := &StormStore{Reads: cache1.Misses - cache0.Misses, Hits: cache1.Hits - cache0.Hits,
			Coalesced: cache1.Coalesced - cache0.Coalesced, Stale: cache1.Stale - cache0.Stale,
			FailClosed: cache1.FailClosed - cache0.FailClosed, PerSecond: perSec}
		if storm.Seconds > 0 {
			st.ReadsPerSec = float64(st.Reads) / storm.Seconds
		}
		for _, x := range perSec {
			st.PeakReadsPerSec = max(st.PeakReadsPerSec, float64(x))
		}
		if len(perSec) == 0 { // a storm shorter than a second
			st.PeakReadsPerSec = st.ReadsPerSec
		}
		out.Store = st
	}
	logf("%s: %s storm: %d/%d connected in %.2fs (%.0f/s), %d failed attempts, %d never; login p50 %.1f ms p99 %.1f ms; broker CPU %.2fs (%.0f µs/connect, peak %d open files), load processes %.2fs",
		m.Name, name, storm.Connected, storm.Terminals, storm.Seconds, out.Clients.PerSec, storm.FailedAttempts, storm.Never,
		out.Clients.Login.P50, out.Clients.Login.P99, out.BrokerCPU, out.BrokerCPUPer, out.PeakFDs, storm.CPUSeconds)
	for _, e := range storm.Errors[:min(3, len(storm.Errors))] {
		logf("%s: %s storm: failed attempt: %s", m.Name, name, e)
	}
	if out.Store != nil {
		logf("%s: %s storm: store reads %d (%.0f/s, peak %.0f/s), cache hits %d, coalesced %d", m.Name, name, out.Store.Reads,
			out.Store.ReadsPerSec, out.Store.PeakReadsPerSec, out.Store.Hits, out.Store.Coalesced)
	}
	return out, nil
}

// stormRatios compares every hook run with the allow-all run of its
// round, storm by storm.
func stormRatios(runs []StormRun) []StormRatio {
	var out []StormRatio
	for _, a := range runs {
		if a.Mode != "allow" {
			continue
		}
		for _, h := range runs {
			if h.Round != a.Round || h.Mode == "allow" {
				continue
			}
			out = append(out, stormRatio(h.Mode, "restart", h.Round, h.Restart, a.Restart))
			if h.Outage != nil && a.Outage != nil {
				out = append(out, stormRatio(h.Mode, "outage", h.Round, *h.Outage, *a.Outage))
			}
		}
	}
	return out
}

func stormRatio(mode, storm string, round int, h, a StormOutcome) StormRatio {
	r := StormRatio{Mode: mode, Storm: storm, Round: round, Rate: stats.Ratio(h.Clients.PerSec, a.Clients.PerSec),
		Capacity:    stats.Ratio(a.BrokerCPUPer, h.BrokerCPUPer),
		ExtraFailed: h.Clients.FailedAttempts + h.Clients.Never - a.Clients.FailedAttempts - a.Clients.Never}
	r.Met = r.Rate >= 0.9 && r.ExtraFailed <= 0
	return r
}

// The markers around the storm's section of BENCHMARKS.md: a new run
// replaces what lies between them, the rest of the file stays.
const (
	stormBegin = "<!-- m2m-bench storm: begin (generated; a new run replaces this section) -->"
	stormEnd   = "<!-- m2m-bench storm: end -->"
)

// writeStormMarkdown writes the storm's section into path: in place of
// the last one, else at the end.
func writeStormMarkdown(path string, r *StormResult) error {
	return writeSection(path, stormBegin, stormEnd, renderStorm(r), false)
}

// writeSection writes section (its markers begin and end included) into
// the Markdown file path in place of the one there (replaceSection); a
// missing file is created.
func writeSection(path, begin, end, section string, atTop bool) error {
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return os.WriteFile(path, []byte(replaceSection(string(old), begin, end, section, atTop)), 0o644)
}

// replaceSection puts section (markers included) in place of doc's part
// from the marker begin to the marker end, both included; everything
// outside them stays as it is. Without the markers, section goes at the
// top of doc with atTop, else at its end.
func replaceSection(doc, begin, end, section string, atTop bool) string {
	// The line break after the end marker is doc's: kept, not doubled.
	section = strings.TrimSuffix(section, "\n")
	i := strings.Index(doc, begin)
	j := strings.Index(doc, end)
	if i >= 0 && j > i {
		return doc[:i] + section + doc[j+len(end):]
	}
	switch {
	case doc == "":
		return section + "\n"
	case atTop:
		return section + "\n\n" + doc
	}
	if !strings.HasSuffix(doc, "\n\n") {
		doc = strings.TrimRight(doc, "\n") + "\n\n"
	}
	return doc + section + "\n"
}

// renderStorm renders the storm's section, markers included.
func renderStorm(r *StormResult) string {
	var b strings.Builder
	s := r.Settings
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("%s\n## Reconnect storm: an idle fleet, the broker restarted, everyone back at once\n\n", stormBegin)
	w("Generated by `m2m-bench storm` on %s (%d round(s), modes interleaved):\n\n```sh\n%s\n```\n\n", r.Started.Format("2006-01-02 15:04 UTC"), s.Rounds, r.Command)
	w("**N = %d terminals** per mode, %d load process(es), dialling from %d source addresses (127.0.0.1 ... 127.0.0.%d).\n", s.N, s.Loaders, s.Sources, s.Sources)
	w("Limits on this machine: RLIMIT_NOFILE %d (hard = soft after m2m-bench raised it; a broker holds one descriptor per\n", s.NoFile)
	w("terminal, so one broker process here holds at most about %d), ephemeral ports %s per source address.\n", int(s.NoFile)-brokerFDReserve, s.PortRange)
	w("`storm` refuses at once an N that does not fit and says which limit to raise and how. Load average: %s.\n\n", r.Load)

	w("| mode | round | storm | until all connected s | rate /s | rate / allow-all | login p50 / p99 ms | ready p50 / p99 ms | failed attempts | never connected | broker CPU s (µs / connect, cores) | load processes CPU s | broker peak open files | store reads (/s, peak /s) | cache hits, coalesced |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	row := func(x StormRun, name string, o StormOutcome) {
		ratio := "—"
		for _, q := range r.Ratios {
			if q.Mode == x.Mode && q.Round == x.Round && q.Storm == name {
				ratio = fmt.Sprintf("%.3f", q.Rate)
				if !q.Met {
					ratio = "**" + ratio + "**"
				}
			}
		}
		reads, absorbed := "—", "—"
		if o.Store != nil {
			reads = fmt.Sprintf("%d (%.0f, %.0f)", o.Store.Reads, o.Store.ReadsPerSec, o.Store.PeakReadsPerSec)
			absorbed = fmt.Sprintf("%d, %d", o.Store.Hits, o.Store.Coalesced)
		}
		c := o.Clients
		w("| %s | %d | %s | %.2f | %.0f | %s | %.1f / %.1f | %.1f / %.1f | %d | %d | %.2f (%.0f, %.2f) | %.2f | %d | %s | %s |\n",
			x.Mode, x.Round, name, c.Seconds, c.PerSec, ratio, c.Login.P50, c.Login.P99, c.Ready.P50, c.Ready.P99,
			c.FailedAttempts, c.Never, o.BrokerCPU, o.BrokerCPUPer, o.BrokerCPUShare, c.LoadCPU, o.PeakFDs, reads, absorbed)
	}
	for _, x := range r.Runs {
		row(x, "restart", x.Restart)
		if x.Outage != nil {
			row(x, "outage", *x.Outage)
		}
	}
	w("\nMemory of the broker (after two full GCs; per terminal = growth / connected):\n\n")
	w("| mode | round | idle: clients | idle: RSS MiB | idle: RSS / terminal | idle: heap / terminal | after the storm: RSS MiB | RSS / terminal | first connect: s, failed attempts |\n")
	w("|---|---|---|---|---|---|---|---|---|\n")
	for _, x := range r.Runs {
		w("| %s | %d | %d | %.0f | %.1f KiB | %.1f KiB | %.0f | %.1f KiB | %.1f, %d |\n", x.Mode, x.Round, x.MemIdle.Clients,
			float64(x.MemIdle.RSS)/(1<<20), x.RSSPerTerm/1024, x.HeapPerTerm/1024, float64(x.MemAfterStorm.RSS)/(1<<20),
			x.RSSPerTermAfter/1024, x.First.Seconds, x.First.FailedAttempts)
	}
	w("\nTargets: rate hook / allow-all >= 0.9; failed attempts + never connected of the hook beyond allow-all's = 0.\n")
	w("The capacity ratio (connects per broker CPU-second, hook / allow-all) is the rate ratio a broker with the machine to\n")
	w("itself would reach; on a shared 2-core machine the wall-clock rate depends on what else runs.\n\n")
	w("| mode | storm | rate ratio, median (rounds) | capacity ratio, median (rounds) | extra failures, sum | met |\n|---|---|---|---|---|---|\n")
	type key struct{ mode, storm string }
	var keys []key
	byKey := map[key][]StormRatio{}
	for _, q := range r.Ratios {
		k := key{q.Mode, q.Storm}
		if _, ok := byKey[k]; !ok {
			keys = append(keys, k)
		}
		byKey[k] = append(byKey[k], q)
	}
	for _, k := range keys {
		var rates, caps []float64
		var rs, cs []string
		extra := 0
		for _, q := range byKey[k] {
			rates, caps = append(rates, q.Rate), append(caps, q.Capacity)
			rs, cs = append(rs, fmt.Sprintf("%.3f", q.Rate)), append(cs, fmt.Sprintf("%.3f", q.Capacity))
			extra += q.ExtraFailed
		}
		rate := stats.Median(rates)
		met := "yes"
		if rate < 0.9 || extra > 0 {
			met = "**no**"
		}
		w("| %s | %s | %.3f (%s) | %.3f (%s) | %d | %s |\n", k.mode, k.storm, rate, strings.Join(rs, ", "),
			stats.Median(caps), strings.Join(cs, ", "), extra, met)
	}
	w("\nHow it runs:\n\n")
	w("- Each mode: a broker child (`m2m-bench serve`, GOGC=%s, GOMEMLIMIT=%s, mochi writes pending %d, buffers %d) and\n", s.GOGC, s.GOMEMLIMIT, s.WritesPending, s.NetBuf)
	w("  `storm-load` children, each holding N/%d bare paho clients (MQTT 3.1.1, clean session, keep-alive 60 s); terminal i\n", s.Loaders)
	w("  dials from 127.0.0.(1 + i mod %d) (a `net.Dialer` with a `LocalAddr` in paho's `CustomOpenConnectionFn`). A terminal\n", s.Sources)
	w("  is connected when it is ready to send: CONNACK, SUBACKs of `$m2m/<sn>/key` and `m2m/<sn>/down/#`, and on the hook the key message of its session key.\n")
	w("- First connect: %d attempts in flight, then %s idle, then the broker's memory (RSS from /proc, heap after two GCs).\n", s.ConnectConcurrency, s.Idle)
	w("- The broker is killed (SIGKILL, as a crash or an OOM kill) and every load process waits until all its connections\n")
	w("  are closed; a new broker child starts on the same port and data, its key-service cache cold (no prewarm: Vault or\n")
	w("  the embedded store is read at each first login).\n")
	conc := "every terminal at once (one goroutine per terminal)"
	if s.StormConcurrency > 0 {
		conc = fmt.Sprintf("%d attempts in flight", s.StormConcurrency)
	}
	w("- The storm: as soon as the new broker listens, the tool re-dials %s; a failed attempt is\n", conc)
	w("  retried at once, without backoff (the worst case: a fleet whose terminals all retry the moment the broker is back;\n")
	w("  real terminals add jitter and backoff, which only spread the load). Each terminal logs in with a fresh M2M1 token.\n")
	w("  *until all connected* is from the start of the storm to the last terminal ready; *login* is one successful attempt\n")
	w("  (TCP connect to ready), *ready* is the start of the storm to ready, retries included; a terminal not connected\n")
	w("  within %s counts as never connected. An attempt fails when TCP does not connect, or CONNACK does not come, within\n", s.Deadline)
	w("  %s each (paho's `ConnectTimeout`), or when the broker refuses it; the terminal then tries again at once.\n", s.AttemptTimeout)
	if s.Outage {
		w("- The outage storm follows on the same broker: every load process cuts all its connections (closes the sockets\n")
		w("  under paho, no DISCONNECT: a network outage), the tool waits until the broker has dropped them all, and every\n")
		w("  terminal re-dials at once again; the broker's cache is warm (records read in the restart storm, TTL %s).\n", s.CacheTTL)
	}
	w("- Broker CPU: user + system of the restarted broker from just before the storm to its end; cores = CPU s / storm s.\n")
	w("  Load processes CPU: the same for all load processes together. On a 2-core machine the\n")
	w("  wall-clock time is shared by both: the broker's CPU per connect is its cost, the time until all connected is the\n")
	w("  machine's.\n")
	w("- Store reads: keysvc cache misses (each one read of the store: Vault's KV or the embedded file) during the storm, and\n")
	w("  their count in each second (the broker's counters read every second). Cache hits and coalesced lookups (waiting\n")
	w("  for another lookup's read of the same terminal) are the lookups the cache kept off the store.\n")
	m := r.Machine
	w("- Machine: %s, %d CPUs, %.1f GiB, %s, %s; load processes, brokers, Vault and the tool share it.\n", m.CPU, m.CPUs, m.MemGiB, m.Kernel, m.GoVersion)
	w("%s\n", stormEnd)
	return b.String()
}

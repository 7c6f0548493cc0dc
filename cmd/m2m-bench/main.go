// Command m2m-bench measures what m2mguard's security costs over a plain
// mochi-mqtt broker (BENCHMARKS.md is its report).
//
//	m2m-bench gen   --n 10000 --out terminals.csv      terminals with secrets, keysvc import CSV
//	m2m-bench serve --mode hook --store bolt ...       a benchmark broker (a child of suite)
//	m2m-bench run   --addr host:port --kind terminal   connect storm + publish load against a broker
//	m2m-bench suite --n 10000 --rounds 5               everything, interleaved; writes its section of BENCHMARKS.md
//	m2m-bench storm --n 19000 --sources 4              idle fleet, broker killed and restarted, all reconnect at once
//
// Progress goes to stderr; results are JSON on stdout (or --out).
// Run `m2m-bench <subcommand> --help` for the flags.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

const usage = `m2m-bench: load generator and benchmark suite for m2mguard (its report: BENCHMARKS.md).

Subcommands:
  gen    write N benchmark terminals with their secrets as keysvc import CSV
  serve  run a benchmark broker (allow-all mochi, or mochi + the m2mguard hook)
  run    drive N terminals against a broker: connect storm, then steady publish load
  suite  run allow-all / hook on bolt / hook on Vault / plaintext vs encrypted / refused logins,
         interleaved and repeated, and write BENCHMARKS.md's section and a JSON result
  nats   run a NATS cluster with JetStream for fleet-mode brokers (serve --nats-urls)
  storm  the reconnect storm: N idle terminals, the broker killed and restarted, all reconnect
         at once; allow-all / hook on bolt / hook on Vault (cold cache); writes a BENCHMARKS.md section
  storm-load  one load process of the storm (a child of storm)

Run 'm2m-bench <subcommand> --help' for its flags.
`

func main() {
	if len(os.Args) < 2 || os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "help" {
		fmt.Fprint(os.Stderr, usage)
		if len(os.Args) < 2 {
			os.Exit(2)
		}
		return
	}
	raiseFileLimit()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "gen":
		err = cmdGen(os.Args[2:])
	case "serve":
		err = cmdServe(ctx, os.Args[2:], os.Stdin, os.Stdout)
	case "run":
		err = cmdRun(ctx, os.Args[2:])
	case "suite":
		err = cmdSuite(ctx, os.Args[2:])
	case "nats":
		err = cmdNATS(ctx, os.Args[2:], os.Stdin, os.Stdout)
	case "storm":
		err = cmdStorm(ctx, os.Args[2:])
	case "storm-load":
		err = cmdStormLoad(ctx, os.Args[2:], os.Stdin, os.Stdout)
	default:
		fmt.Fprintf(os.Stderr, "m2m-bench: unknown subcommand %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if err == flag.ErrHelp {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "m2m-bench:", err)
		os.Exit(1)
	}
}

// raiseFileLimit lifts the soft open-file limit to the hard one: 10,000
// connections need 10,000 descriptors on each side. The hard limit itself
// is the machine's (storm's checkStormLimits says when N exceeds it).
func raiseFileLimit() {
	var rl syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) == nil && rl.Cur < rl.Max {
		rl.Cur = rl.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
	}
}

func newFlags(name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: m2m-bench %s [flags]\n\n%s\n\nFlags:\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

func cmdGen(args []string) error {
	fs := newFlags("gen", "Writes N benchmark terminals (sn BENCH00000000...) with fresh random secrets as the\n"+
		"import CSV of keysvc (sn,imei,imsi,msisdn,alg,up,down,bk). Import it into the broker's store\n"+
		"(keysvc.Service.Import) and give the same file to 'run --terminals'. It holds secrets: mode 0600.")
	n := fs.Int("n", 10000, "number of terminals")
	out := fs.String("out", "terminals.csv", "output file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	f, err := os.OpenFile(*out, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if err := writeTerminals(f, genTerminals(*n)); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// addBrokerFlags registers the flags of a BrokerConfig.
func addBrokerFlags(fs *flag.FlagSet, c *BrokerConfig) {
	fs.StringVar(&c.Mode, "mode", "hook", "allow (mochi + auth.AllowHook only) or hook (mochi + the m2mguard hook only)")
	fs.StringVar(&c.Store, "store", "bolt", "hook mode: bolt or vault")
	fs.StringVar(&c.Listen, "listen", "127.0.0.1:0", "listen address")
	fs.StringVar(&c.BoltPath, "bolt", "m2mguard.db", "bolt store file (master key from $"+boltstore.EnvMasterKey+", else <file>.key)")
	fs.StringVar(&c.VaultAddr, "vault-addr", os.Getenv("VAULT_ADDR"), "Vault address (token from $VAULT_TOKEN)")
	fs.StringVar(&c.VaultPfx, "vault-prefix", "", "KV prefix below secret/ (default m2mguard)")
	fs.DurationVar(&c.CacheTTL, "cache-ttl", time.Hour, "keysvc read cache TTL")
	fs.DurationVar(&c.StoreTimeout, "store-timeout", 0, "hook mode: timeout of one key-service call during a login (the broker's auth.store_timeout; 0 = its default, 2s)")
	fs.DurationVar(&c.ThrottlePeriod, "throttle-period", 0, "hook mode: the login throttle's first and longest refusal period (0 = the hook's defaults, 1s doubling up to 15m)")
	fs.BoolVar(&c.Prewarm, "prewarm", true, "look every terminal up before listening (warm cache)")
	fs.IntVar(&c.WritesPending, "writes-pending", 256, "mochi Capabilities.MaximumClientWritesPending (mochi's default 8192 costs ~89 KiB per idle client)")
	fs.IntVar(&c.NetBuf, "netbuf", 2048, "mochi ClientNetReadBufferSize and ClientNetWriteBufferSize")
	fs.Func("nats-urls", "hook mode: fleet mode on these NATS servers (comma-separated; `m2m-bench nats`), password from $"+envNATSPassword, func(v string) error {
		c.NATSURLs = strings.Split(v, ",")
		return nil
	})
	fs.StringVar(&c.BrokerID, "broker-id", "bench-broker", "fleet mode: this broker's id in the fleet")
}

func finishBrokerFlags(c *BrokerConfig) error {
	c.VaultToken = os.Getenv("VAULT_TOKEN")
	c.NATSPassword = os.Getenv(envNATSPassword)
	if c.Mode == "hook" && c.Store == "bolt" {
		key, err := boltstore.LoadOrCreateMasterKey("", c.BoltPath+".key")
		if err != nil {
			return err
		}
		c.MasterKey = key
	}
	return nil
}

// cmdServe runs a broker until stdin ends. It prints {"addr": ...} on
// stdout once it listens, then answers one JSON line per command line on
// stdin: "mem" (memory after a full GC), "cache" (cache counters), "cpu"
// (the process's CPU time), "fds" (open descriptors), "logins" (the hook's
// login counts), "profile-start FILE"
// and "profile-stop".
func cmdServe(ctx context.Context, args []string, in io.Reader, out io.Writer) error {
	var cfg BrokerConfig
	var cpuprof string
	fs := newFlags("serve", "Runs one benchmark broker until stdin closes or SIGTERM. Prints {\"addr\":...} on stdout when it\n"+
		"listens; then reads commands on stdin, one per line, and answers each with a JSON line:\n"+
		"  mem    heap, stacks and clients after two full GCs\n"+
		"  cache  keysvc cache counters\n"+
		"  cpu    CPU time (user + system) the broker process has used, the garbage collector's share\n"+
		"         of it (the runtime's estimate), both in ns, and the number of GC cycles\n"+
		"  profile-start FILE  start a CPU profile of the broker into FILE\n"+
		"  profile-stop        stop it (the suite profiles each storm so with --profile-dir)\n"+
		"  claims latencies (ms) of the fleet's replay claims since the last `claims` (fleet mode)\n"+
		"  fds    open file descriptors of the broker process\n"+
		"  logins the hook's login counts so far (m2mguard_logins_total): {\"accepted\":n,\"refused/<reason>\":n}")
	addBrokerFlags(fs, &cfg)
	fs.StringVar(&cpuprof, "cpuprofile", "", "write a CPU profile of the broker here")
	memprof := fs.String("memprofile", "", "write an allocation profile of the broker here when it exits")
	importCSV := fs.String("import", "", "hook mode: import this 'gen' CSV into the store first (rows already there are skipped)")
	app := fs.String("app", "", "hook mode: add (or replace) this application, password from $M2MBENCH_APP_PASSWORD")
	if err := fs.Parse(args); err != nil {
		return err
	}
	// One CPU profile at a time: the whole run's (--cpuprofile) or the
	// one the profile-start and profile-stop commands bracket.
	var prof cpuProfile
	defer prof.stop()
	if cpuprof != "" {
		if err := prof.start(cpuprof); err != nil {
			return err
		}
	}
	if *memprof != "" {
		defer writeHeapProfile(*memprof)
	}
	if err := finishBrokerFlags(&cfg); err != nil {
		return err
	}
	if cfg.Mode == "hook" && (*importCSV != "" || *app != "") {
		if err := provisionFile(ctx, cfg, *importCSV, *app, os.Getenv("M2MBENCH_APP_PASSWORD")); err != nil {
			return err
		}
	}
	b, err := StartBroker(ctx, cfg)
	if err != nil {
		return err
	}
	defer b.Close()
	enc := json.NewEncoder(out)
	enc.Encode(map[string]string{"addr": b.Addr})
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(in)
		for sc.Scan() {
			lines <- strings.TrimSpace(sc.Text())
		}
		close(lines)
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case l, ok := <-lines:
			if !ok {
				return nil
			}
			cmd, arg, _ := strings.Cut(l, " ")
			switch cmd {
			case "profile-start":
				enc.Encode(answer(prof.start(arg)))
			case "profile-stop":
				enc.Encode(answer(prof.stop()))
			case "mem":
				enc.Encode(b.Mem())
			case "cache":
				enc.Encode(b.CacheStats())
			case "cpu":
				enc.Encode(cpuReport())
			case "claims":
				enc.Encode(b.Claims())
			case "fds":
				enc.Encode(map[string]int{"fds": openFiles()})
			case "logins":
				if l, err := b.Logins(); err != nil {
					enc.Encode(answer(err))
				} else {
					enc.Encode(l)
				}
			default:
				enc.Encode(map[string]string{"error": "unknown command " + l})
			}
		}
	}
}

// writeHeapProfile writes the allocation profile (pprof's alloc_space and
// alloc_objects views show what was allocated since the start).
func writeHeapProfile(path string) {
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "m2m-bench: memprofile:", err)
		return
	}
	defer f.Close()
	if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
		fmt.Fprintln(os.Stderr, "m2m-bench: memprofile:", err)
	}
}

func cmdRun(ctx context.Context, args []string) error {
	var cfg LoadConfig
	fs := newFlags("run", "Drives N terminals against a broker: sequential CONNECT round trips, a connect storm\n"+
		"(connects/s, latency percentiles), then a steady publish load end to end to an application\n"+
		"subscriber on m2m/+/up/#. The terminals come from a 'gen' CSV that the broker's store imported.\n"+
		"kind=terminal uses the reference client (client/); kind=plain uses bare paho clients without\n"+
		"credentials (for an allow-all broker), doing the same subscriptions. Result: JSON on stdout or --out.")
	fs.StringVar(&cfg.Addr, "addr", "127.0.0.1:1883", "broker host:port")
	fs.StringVar(&cfg.Kind, "kind", "terminal", "terminal (reference client), m2m1 (bare paho with an M2M1 login), plain (bare paho, no credentials); or, timed from CONNECT to CONNACK only, accept-connack (a genuine login, then disconnected), refuse-digest, refuse-unknown, refuse-throttled (each terminal failed 5 times first; the broker's refusal period must outlast the run: serve --throttle-period)")
	fs.BoolVar(&cfg.SessionKey, "session-key", true, "terminal and m2m1 kinds: ask for a session key (terminal: and send sealed payloads)")
	file := fs.String("terminals", "terminals.csv", "terminals CSV written by 'gen'")
	fs.IntVar(&cfg.N, "n", 1000, "terminals connected at once")
	fs.IntVar(&cfg.Concurrency, "concurrency", 64, "connection attempts in flight during the storm")
	fs.IntVar(&cfg.RTTSamples, "rtt", 200, "sequential CONNECT round trips measured before the storm")
	fs.IntVar(&cfg.Publishers, "publishers", 64, "terminals publishing during the publish load")
	fs.DurationVar(&cfg.Duration, "duration", 10*time.Second, "publish load duration (0 = none)")
	qos := fs.Int("qos", 1, "QoS of the uplink publishes (0 or 1)")
	fs.IntVar(&cfg.PayloadSize, "payload", 64, "plaintext bytes per message (>= 8)")
	fs.StringVar(&cfg.AppUser, "app-user", "", "application subscriber's name (empty for an allow-all broker); password from $M2MBENCH_APP_PASSWORD")
	out := fs.String("out", "", "write the JSON result here instead of stdout")
	cpuprof := fs.String("cpuprofile", "", "write a CPU profile of the load generator here")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cpuprof != "" {
		var prof cpuProfile
		if err := prof.start(*cpuprof); err != nil {
			return err
		}
		defer prof.stop()
	}
	if err := checkLoadFiles(cfg.N, fileLimit()); err != nil {
		return err
	}
	cfg.QoS = byte(*qos)
	cfg.AppPassword = os.Getenv("M2MBENCH_APP_PASSWORD")
	cfg.Progress = os.Stderr
	f, err := os.Open(*file)
	if err != nil {
		return err
	}
	cfg.Terminals, err = readTerminals(f)
	f.Close()
	if err != nil {
		return err
	}
	res, err := RunLoad(ctx, cfg)
	if err != nil {
		return err
	}
	return writeJSON(*out, res)
}

// writeJSON writes v indented to path, or to stdout for "".
func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	data = append(data, '\n')
	if path == "" {
		_, err = os.Stdout.Write(data)
		return err
	}
	return os.WriteFile(path, data, 0o644)
}

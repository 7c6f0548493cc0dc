// Command m2m-flood runs the hostile-load flood suite against the
// m2mguard-broker binary, from outside, over loopback, as an outside
// reviewer would: each scenario starts a broker process of its own (fresh
// data directory, free ports, embedded store, log to a file), registers a
// terminal through the admin API, attacks, and reports the broker's
// resident memory before and after, refusal rates and the genuine
// terminal's login latency.
//
//	m2m-flood                                    every scenario, 30 s each, broker built from ./cmd/m2mguard-broker
//	m2m-flood --broker ./m2mguard-broker --scenario throttle --failures 1000000
//	m2m-flood --scenario app,control --seconds 10 --json > result.json
//
// Scenarios (SECURITY.md, "Attacks tried"):
//
//	app       application logins with fresh names and random passwords from 256 workers
//	wedge     a terminal session that stops reading and floods its control topic; then a takeover and an admin disconnect
//	throttle  failed terminal logins with fresh serial numbers, as fast as possible
//	ws        2,000 WebSocket connections that never send CONNECT
//	control   a terminal that never subscribes to its key topic floods garbage control messages
//	phantom   valid CONNECTs reset before the CONNACK; then the sessions the broker still lists
//
// Progress goes to stderr, the tables (or --json) to stdout. Exit codes: 0
// every scenario ran, 1 a scenario could not run, 2 usage error, 3 with
// --strict: a target was not met.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
	exitUnmet   = 3
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// Config is the suite's command line.
type Config struct {
	Broker      string   // broker binary; "" = build it
	Scenarios   []string // in order
	Seconds     time.Duration
	Cooldown    time.Duration
	JSON        bool
	Strict      bool
	Keep        bool
	RSSLimitMiB int64
	BrokerFlags []string // extra broker flags, appended to the suite's

	ConnectTimeout  time.Duration // the broker's mqtt.connect_timeout
	LoginTimeout    time.Duration // a genuine login that takes longer failed
	GenuineInterval time.Duration
	Attacker        string // source address of the attacks
	Genuine         string // source address of the genuine terminal

	AppWorkers      int
	ThrottleWorkers int
	Failures        int64         // throttle: stop after this many refusals (0 = after Seconds)
	ThrottleLimit   time.Duration // throttle with Failures: give up after this long
	WSConns         int
	WSGrace         time.Duration
	WedgeTimeout    time.Duration
	Phantoms        int
}

// scenarios are every scenario, in the default order.
var scenarios = []*scenario{appScenario, wedgeScenario, throttleScenario, wsScenario, controlScenario, phantomScenario}

func scenarioNames() []string {
	var names []string
	for _, s := range scenarios {
		names = append(names, s.name)
	}
	return names
}

// seconds is a duration flag that also takes a plain number of seconds
// ("30", "1.5", "30s", "2m").
type seconds struct{ d *time.Duration }

func (s seconds) String() string {
	if s.d == nil {
		return ""
	}
	return s.d.String()
}

func (s seconds) Set(v string) error {
	if f, err := strconv.ParseFloat(v, 64); err == nil {
		*s.d = time.Duration(f * float64(time.Second))
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return errors.New("want a duration (30s, 2m) or a number of seconds")
	}
	*s.d = d
	return nil
}

// durationVar registers a seconds flag with its default.
func durationVar(fs *flag.FlagSet, d *time.Duration, name string, def time.Duration, usage string) {
	*d = def
	fs.Var(seconds{d}, name, usage)
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, " ") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func parseFlags(args []string, stderr io.Writer) (*Config, error) {
	c := &Config{}
	fs := flag.NewFlagSet("m2m-flood", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: m2m-flood [flags]\n\n"+
			"Runs the hostile-load flood suite against the m2mguard-broker binary: each scenario on a broker\n"+
			"process of its own, on loopback, with a fresh data directory. Scenarios: %s.\n"+
			"Tables (or --json) on stdout, progress on stderr. Exit codes: 0 ran, 1 a scenario could not run,\n"+
			"2 usage, 3 --strict and a target not met.\n\nFlags:\n", strings.Join(scenarioNames(), ", "))
		fs.PrintDefaults()
	}
	var list string
	var brokerFlags stringList
	fs.StringVar(&c.Broker, "broker", "", "broker binary (default: go build "+brokerPkg+" into a temporary directory)")
	fs.StringVar(&list, "scenario", strings.Join(scenarioNames(), ","), "scenarios to run, comma-separated, in this order")
	durationVar(fs, &c.Seconds, "seconds", 30*time.Second, "how long each attack runs (a number is seconds)")
	durationVar(fs, &c.Cooldown, "cooldown", 10*time.Second, "idle time after each attack before the last RSS figure")
	fs.BoolVar(&c.JSON, "json", false, "print the results as JSON instead of tables")
	fs.BoolVar(&c.Strict, "strict", false, "exit 3 when a target is not met")
	fs.BoolVar(&c.Keep, "keep", false, "keep each broker's data directory and log (the path is printed)")
	fs.Int64Var(&c.RSSLimitMiB, "rss-limit-mib", 6144, "kill the broker and stop the attack when its RSS passes this (0 = no limit)")
	fs.Var(&brokerFlags, "broker-flag", "extra flag for every broker, e.g. --broker-flag=--log-level=warn (repeatable)")
	durationVar(fs, &c.ConnectTimeout, "connect-timeout", 5*time.Second, "the brokers' --mqtt-connect-timeout (CONNECT deadline)")
	durationVar(fs, &c.LoginTimeout, "login-timeout", 10*time.Second, "a genuine login without CONNACK after this counts as failed")
	durationVar(fs, &c.GenuineInterval, "genuine-interval", 100*time.Millisecond, "pause between the genuine terminal's logins")
	fs.StringVar(&c.Attacker, "attacker", "127.0.0.1", "source address of the attacks")
	fs.StringVar(&c.Genuine, "genuine", "127.0.0.2", "source address of the genuine terminal")
	fs.IntVar(&c.AppWorkers, "app-workers", 256, "app: concurrent workers")
	fs.IntVar(&c.ThrottleWorkers, "throttle-workers", 8, "throttle: concurrent workers")
	fs.Int64Var(&c.Failures, "failures", 0, "throttle: run until this many refusals instead of --seconds (the judged run: 1000000)")
	durationVar(fs, &c.ThrottleLimit, "throttle-limit", 15*time.Minute, "throttle with --failures: stop after this long even if short of them")
	fs.IntVar(&c.WSConns, "ws-conns", 2000, "ws: connections")
	durationVar(fs, &c.WSGrace, "ws-grace", 5*time.Second, "ws: count open connections this long after the CONNECT deadline")
	durationVar(fs, &c.WedgeTimeout, "wedge-timeout", 15*time.Second, "wedge: how long to wait for the takeover's CONNACK and for the admin disconnect")
	fs.IntVar(&c.Phantoms, "phantoms", 1600, "phantom: valid CONNECTs reset before the CONNACK")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	c.BrokerFlags = brokerFlags
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		if !slices.Contains(scenarioNames(), n) {
			return nil, fmt.Errorf("--scenario: unknown %q (want some of %s)", n, strings.Join(scenarioNames(), ","))
		}
		c.Scenarios = append(c.Scenarios, n)
	}
	switch {
	case len(c.Scenarios) == 0:
		return nil, errors.New("--scenario: none given")
	case c.Seconds <= 0 || c.ConnectTimeout <= 0 || c.LoginTimeout <= 0 || c.GenuineInterval <= 0 || c.WedgeTimeout <= 0:
		return nil, errors.New("--seconds, --connect-timeout, --login-timeout, --genuine-interval and --wedge-timeout must be positive")
	case c.AppWorkers < 1 || c.ThrottleWorkers < 1 || c.WSConns < 1 || c.Phantoms < 1:
		return nil, errors.New("--app-workers, --throttle-workers, --ws-conns and --phantoms must be at least 1")
	case c.Failures < 0 || c.RSSLimitMiB < 0 || c.Cooldown < 0 || c.WSGrace < 0:
		return nil, errors.New("--failures, --rss-limit-mib, --cooldown and --ws-grace must not be negative")
	}
	return c, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	if err != nil {
		fmt.Fprintln(stderr, "m2m-flood:", err)
		return exitUsage
	}
	work, err := os.MkdirTemp("", "m2m-flood-")
	if err != nil {
		fmt.Fprintln(stderr, "m2m-flood:", err)
		return exitFailure
	}
	if cfg.Keep {
		fmt.Fprintln(stderr, "m2m-flood: brokers' data and logs kept in", work)
	} else {
		defer os.RemoveAll(work)
	}
	bin := cfg.Broker
	if bin != "" {
		// Absolute: each broker runs in a directory of its own.
		if bin, err = filepath.Abs(bin); err != nil {
			fmt.Fprintln(stderr, "m2m-flood:", err)
			return exitFailure
		}
	} else {
		fmt.Fprintln(stderr, "m2m-flood: building", brokerPkg)
		if bin, err = buildBroker(ctx, work); err != nil {
			fmt.Fprintln(stderr, "m2m-flood:", err)
			return exitFailure
		}
	}
	var results []*Result
	for _, name := range cfg.Scenarios {
		if ctx.Err() != nil {
			break
		}
		for _, sc := range scenarios {
			if sc.name == name {
				results = append(results, runScenario(ctx, cfg, bin, work, sc, stderr))
			}
		}
	}
	if cfg.JSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(struct {
			Broker  string    `json:"broker"`
			Command []string  `json:"command"`
			Results []*Result `json:"results"`
		}{bin, append([]string{"m2m-flood"}, args...), results})
	} else {
		for _, r := range results {
			writeTable(stdout, r)
		}
	}
	code := exitOK
	for _, r := range results {
		if r.Error != "" {
			code = exitFailure
		}
		for _, c := range r.Checks {
			if !c.Met && cfg.Strict && code == exitOK {
				code = exitUnmet
			}
		}
	}
	if ctx.Err() != nil {
		code = exitFailure
	}
	return code
}

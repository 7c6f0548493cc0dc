package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// The load side of the reconnect storm (storm.go): a `storm-load` process
// holds a slice of the terminals, each a bare paho client dialling from
// one of several 127.0.0.x source addresses (a source address has one
// ephemeral port range: about 28,000 connections to one broker port),
// and answers the storm's commands on stdin.

// PhaseResult is what one load process saw in one phase (the first
// connect, or the reconnect storm) for its terminals.
type PhaseResult struct {
	Terminals int `json:"terminals"`
	Connected int `json:"connected"`
	// Never is how many terminals were still not connected at the
	// phase's deadline.
	Never int `json:"never"`
	// FailedAttempts counts attempts that ended in an error (refused,
	// reset, timed out, not authorized); each is retried at once.
	FailedAttempts int     `json:"failed_attempts"`
	Seconds        float64 `json:"seconds"` // from the start of the phase to the last terminal connected
	// CPUSeconds is the CPU time the load process used in the phase.
	CPUSeconds float64 `json:"cpu_seconds"`
	// LoginMS is the duration of every successful attempt (TCP connect
	// to ready: CONNACK, SUBACKs and the key message) in ms.
	LoginMS []float64 `json:"login_ms,omitempty"`
	// ReadyMS is, per connected terminal, the time from the start of the
	// phase to its being ready, retries included, in ms.
	ReadyMS []float64 `json:"ready_ms,omitempty"`
	Errors  []string  `json:"errors,omitempty"` // the first few
}

// merge adds o (another load process's result for the same phase).
func (p *PhaseResult) merge(o PhaseResult) {
	p.Terminals += o.Terminals
	p.Connected += o.Connected
	p.Never += o.Never
	p.FailedAttempts += o.FailedAttempts
	p.Seconds = max(p.Seconds, o.Seconds)
	p.CPUSeconds += o.CPUSeconds
	p.LoginMS = append(p.LoginMS, o.LoginMS...)
	p.ReadyMS = append(p.ReadyMS, o.ReadyMS...)
	for _, e := range o.Errors {
		if len(p.Errors) < 10 {
			p.Errors = append(p.Errors, e)
		}
	}
}

// stormLoader drives one load process's terminals.
type stormLoader struct {
	addr       string
	terms      []*Terminal
	sources    []net.IP
	m2m1       bool // an M2M1 login (else no credentials: the allow-all baseline)
	sessionKey bool
	// timeout bounds the TCP connect and, apart, the wait for CONNACK
	// (paho's ConnectTimeout); the whole attempt, SUBACKs and key message
	// included, gets twice that and 5 s.
	timeout time.Duration

	mu    sync.Mutex
	conns []*plainConn // by terminal; nil until connected
	socks []net.Conn   // by terminal: the socket under its paho client (drop)
}

// tune makes terminal i's paho client dial from its source address and
// keeps the socket, so that drop can cut it.
func (l *stormLoader) tune(i int) func(*paho.ClientOptions) {
	d := &net.Dialer{Timeout: l.timeout, LocalAddr: &net.TCPAddr{IP: l.sources[i%len(l.sources)]}}
	return func(o *paho.ClientOptions) {
		o.SetConnectTimeout(l.timeout)
		o.SetCustomOpenConnectionFn(func(uri *url.URL, _ paho.ClientOptions) (net.Conn, error) {
			c, err := d.Dial("tcp", uri.Host)
			if err == nil {
				l.mu.Lock()
				l.socks[i] = c
				l.mu.Unlock()
			}
			return c, err
		})
	}
}

// drop cuts every terminal's socket under its paho client, without a
// DISCONNECT: a network outage, as both ends see it. It shuts the
// reading side down (RST on close) rather than closing the socket: paho
// takes a read on a socket closed under it for its own disconnect, and an
// end of stream for a lost connection, which it then closes.
func (l *stormLoader) drop() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for i, c := range l.socks {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
			tc.CloseRead()
			l.socks[i] = nil
			n++
		}
	}
	return n
}

// run connects every terminal that is not connected, with at most
// concurrency attempts in flight (0: all at once, one goroutine per
// terminal), each retrying at once after a failure until it is connected
// or the deadline passes.
func (l *stormLoader) run(ctx context.Context, concurrency int, deadline time.Duration) PhaseResult {
	l.mu.Lock()
	var todo []int
	for i, c := range l.conns {
		if c != nil {
			c.close() // lost already; frees paho's state
			l.conns[i] = nil
		}
		todo = append(todo, i)
	}
	l.mu.Unlock()
	if concurrency <= 0 || concurrency > len(todo) {
		concurrency = len(todo)
	}
	res := PhaseResult{Terminals: len(todo)}
	errs := &errList{}
	var failed atomic.Int64
	login := make([]time.Duration, len(l.terms))
	ready := make([]time.Duration, len(l.terms))
	var next atomic.Int64
	var wg sync.WaitGroup
	cpu0 := processCPU()
	start := time.Now()
	end := start.Add(deadline)
	for range concurrency {
		wg.Go(func() {
			for {
				k := int(next.Add(1) - 1)
				if k >= len(todo) || ctx.Err() != nil {
					return
				}
				i := todo[k]
				t := l.terms[i]
				for time.Now().Before(end) && ctx.Err() == nil {
					until := time.Now().Add(2*l.timeout + 5*time.Second)
					if until.After(end) {
						until = end
					}
					actx, cancel := context.WithDeadline(ctx, until)
					t0 := time.Now()
					c, err := connectPlain(actx, l.addr, t, l.m2m1, l.sessionKey, l.tune(i))
					cancel()
					if err != nil {
						failed.Add(1)
						errs.add("%s: %v", t.ID.SN, err)
						continue
					}
					now := time.Now()
					login[i], ready[i] = now.Sub(t0), now.Sub(start)
					l.mu.Lock()
					l.conns[i] = c.(*plainConn)
					l.mu.Unlock()
					break
				}
			}
		})
	}
	wg.Wait()
	res.CPUSeconds = (processCPU() - cpu0).Seconds()
	res.FailedAttempts = int(failed.Load())
	res.Errors = errs.errs
	for _, i := range todo {
		if ready[i] == 0 {
			res.Never++
			continue
		}
		res.Connected++
		res.Seconds = max(res.Seconds, ready[i].Seconds())
		res.LoginMS = append(res.LoginMS, ms3(login[i]))
		res.ReadyMS = append(res.ReadyMS, ms3(ready[i]))
	}
	return res
}

// ms3 is d in milliseconds rounded to the microsecond (shorter JSON).
func ms3(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// open counts the terminals whose connection is still open.
func (l *stormLoader) open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, c := range l.conns {
		if c != nil && c.pc.IsConnectionOpen() {
			n++
		}
	}
	return n
}

// closeAll disconnects every terminal.
func (l *stormLoader) closeAll() {
	l.mu.Lock()
	var cs []benchConn
	for i, c := range l.conns {
		if c != nil {
			cs = append(cs, c)
			l.conns[i] = nil
		}
	}
	l.mu.Unlock()
	closeAll(cs)
}

// parseSources parses a comma-separated list of local IPv4 addresses.
func parseSources(s string) ([]net.IP, error) {
	var ips []net.IP
	for _, f := range strings.Split(s, ",") {
		ip := net.ParseIP(strings.TrimSpace(f))
		if ip == nil || ip.To4() == nil {
			return nil, fmt.Errorf("source address %q: not an IPv4 address", f)
		}
		ips = append(ips, ip)
	}
	return ips, nil
}

// loopbackSources returns n source addresses 127.0.0.1 ... 127.0.0.n.
func loopbackSources(n int) string {
	var s []string
	for i := 1; i <= n; i++ {
		s = append(s, fmt.Sprintf("127.0.0.%d", i))
	}
	return strings.Join(s, ",")
}

// cmdStormLoad is the `storm-load` subcommand: a child of `storm`.
func cmdStormLoad(ctx context.Context, args []string, in io.Reader, out io.Writer) error {
	fs := newFlags("storm-load", "One load process of the reconnect storm (a child of 'm2m-bench storm'). Holds terminals\n"+
		"--from ... --from+--count-1 of the CSV as bare paho clients, terminal i dialling from source\n"+
		"address i mod len(--sources). Prints {\"terminals\":N} on stdout, then answers one JSON line per\n"+
		"command line on stdin:\n"+
		"  connect C D    connect every terminal not connected, C attempts in flight (0 = all at once),\n"+
		"                 each retried at once after a failure, for at most D (a Go duration)\n"+
		"  open           how many connections are still open\n"+
		"  drop           close every terminal's socket under paho, without DISCONNECT (a network outage)\n"+
		"  close          disconnect every terminal\n"+
		"It disconnects every terminal and exits when stdin ends.")
	addr := fs.String("addr", "127.0.0.1:1883", "broker host:port")
	file := fs.String("terminals", "terminals.csv", "terminals CSV written by 'gen'")
	from := fs.Int("from", 0, "first terminal of the CSV")
	count := fs.Int("count", 0, "terminals (0 = all from --from)")
	sources := fs.String("sources", "127.0.0.1", "source addresses, comma-separated (every 127.0.0.x is local on Linux)")
	kind := fs.String("kind", "m2m1", "m2m1 (bare paho with an M2M1 login) or plain (no credentials, for an allow-all broker)")
	sessionKey := fs.Bool("session-key", true, "m2m1: ask for a session key and wait for the key message")
	timeout := fs.Duration("attempt-timeout", 30*time.Second, "TCP connect timeout, and CONNACK timeout, of one attempt")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *kind != "m2m1" && *kind != "plain" {
		return fmt.Errorf("unknown kind %q (m2m1 or plain)", *kind)
	}
	srcs, err := parseSources(*sources)
	if err != nil {
		return err
	}
	f, err := os.Open(*file)
	if err != nil {
		return err
	}
	terms, err := readTerminals(f)
	f.Close()
	if err != nil {
		return err
	}
	if *count == 0 {
		*count = len(terms) - *from
	}
	if *from < 0 || *count < 0 || *from+*count > len(terms) {
		return fmt.Errorf("terminals %d..%d asked, the CSV has %d", *from, *from+*count-1, len(terms))
	}
	if err := checkLoadFiles(*count, fileLimit()); err != nil {
		return err
	}
	l := &stormLoader{addr: *addr, terms: terms[*from : *from+*count], sources: srcs,
		m2m1: *kind == "m2m1", sessionKey: *kind == "m2m1" && *sessionKey, timeout: *timeout}
	l.conns = make([]*plainConn, len(l.terms))
	l.socks = make([]net.Conn, len(l.terms))
	defer l.closeAll()
	enc := json.NewEncoder(out)
	enc.Encode(map[string]int{"terminals": len(l.terms)})
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		cmd, arg, _ := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		switch cmd {
		case "connect":
			c, d, err := parseConnectArgs(arg)
			if err != nil {
				enc.Encode(answer(err))
				continue
			}
			enc.Encode(l.run(ctx, c, d))
		case "drop":
			l.drop()
			enc.Encode(answer(nil))
		case "open":
			enc.Encode(map[string]int{"open": l.open()})
		case "close":
			l.closeAll()
			enc.Encode(answer(nil))
		default:
			enc.Encode(answer(errors.New("unknown command " + cmd)))
		}
	}
	return sc.Err()
}

// parseConnectArgs parses the arguments of the connect command: "C D".
func parseConnectArgs(arg string) (int, time.Duration, error) {
	f := strings.Fields(arg)
	if len(f) != 2 {
		return 0, 0, errors.New("connect C D: two arguments")
	}
	var c int
	if _, err := fmt.Sscan(f[0], &c); err != nil || c < 0 {
		return 0, 0, fmt.Errorf("connect C D: bad concurrency %q", f[0])
	}
	d, err := time.ParseDuration(f[1])
	if err != nil || d <= 0 {
		return 0, 0, fmt.Errorf("connect C D: bad deadline %q", f[1])
	}
	return c, d, nil
}

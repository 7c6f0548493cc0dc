package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	pahopackets "github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/stats"
)

// LoadConfig describes one load run against a broker.
type LoadConfig struct {
	Addr string // broker host:port
	// Kind of client: "plain" (bare paho, no credentials: the allow-all
	// baseline), "m2m1" (bare paho with an M2M1 login: the broker's cost
	// alone) or "terminal" (the reference client, client/); or one of the
	// CONNACK-only kinds (connackKinds), which measure the login's answer
	// alone: "accept-connack" and the refusals "refuse-digest",
	// "refuse-unknown" and "refuse-throttled".
	Kind        string
	SessionKey  bool        // m2m1 and terminal: ask for a session key (terminal: and seal data, SPEC sections 5, 6)
	Terminals   []*Terminal // the terminals to drive (the first N)
	N           int         // terminals connected at once
	Concurrency int         // connection attempts in flight during the storm
	RTTSamples  int         // sequential CONNECT round trips measured before the storm (connect only)

	Publishers  int           // connected terminals that publish during the steady load
	Duration    time.Duration // steady publish load; 0 = no publish phase
	QoS         byte          // of the uplink publishes
	PayloadSize int           // bytes of plaintext per message (at least 8: the send time)

	AppUser, AppPassword string // the application subscriber's credentials ("" under allow-all)

	// ThrottleFree is the broker's hook.ThrottleOptions.Free (0: the
	// default's): refuse-throttled fails each terminal so many times
	// before the RTT samples, which puts it in a refusal period.
	ThrottleFree int

	Progress io.Writer // progress lines; nil = none
	// BeforeStorm, if set, runs after the RTT samples, just before the
	// connect storm; AfterConnect, if set, runs once the storm is over,
	// before the publish phase (the suite reads the broker's CPU time and
	// memory there).
	BeforeStorm, AfterConnect func()
}

// ConnectResult is the connect storm's outcome. For the CONNACK-only kinds
// an attempt is "connected" when its CONNACK brought the expected answer
// (acceptance, or the refusal), and nobody stays connected.
type ConnectResult struct {
	Attempted int           `json:"attempted"`
	Connected int           `json:"connected"`
	Failed    int           `json:"failed"`
	Seconds   float64       `json:"seconds"`
	PerSec    float64       `json:"connects_per_sec"`
	Latency   stats.Latency `json:"latency"`
	// ClientCPUPerConn is the CPU time the load generator's process used
	// during the storm, per connected client, in microseconds.
	ClientCPUPerConn float64 `json:"client_cpu_us_per_conn"`
}

// PublishResult is the steady publish load's outcome.
type PublishResult struct {
	Publishers   int           `json:"publishers"`
	QoS          byte          `json:"qos"`
	PayloadBytes int           `json:"payload_bytes"`
	Seconds      float64       `json:"seconds"`
	Sent         int64         `json:"sent"`
	Received     int64         `json:"received"`
	PerSec       float64       `json:"received_per_sec"` // messages/s delivered to the application
	Publish      stats.Latency `json:"publish_latency"`  // Publish call to its return (PUBACK at QoS 1)
	EndToEnd     stats.Latency `json:"end_to_end"`       // Publish call to the application's handler
}

// LoadResult is the machine-readable result of one load run.
type LoadResult struct {
	Kind       string         `json:"kind"`
	SessionKey bool           `json:"session_key"`
	Addr       string         `json:"addr"`
	N          int            `json:"n"`
	RTT        stats.Latency  `json:"connect_rtt"` // sequential CONNECT→CONNACK, nothing else in flight
	Connect    ConnectResult  `json:"connect"`
	Publish    *PublishResult `json:"publish,omitempty"`
	Errors     []string       `json:"errors,omitempty"` // the first few
}

// benchConn is one connected terminal, whatever drives it.
type benchConn interface {
	publish(ctx context.Context, payload []byte, qos byte) error
	close()
}

type plainConn struct {
	pc    paho.Client
	topic string
}

func (p *plainConn) publish(ctx context.Context, payload []byte, qos byte) error {
	tok := p.pc.Publish(p.topic, qos, false, payload)
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (p *plainConn) close() { p.pc.Disconnect(0) }

type termConn struct{ c *client.Client }

func (t *termConn) publish(ctx context.Context, payload []byte, qos byte) error {
	return t.c.Publish(ctx, "data", payload, qos)
}

func (t *termConn) close() { t.c.Close() }

func pahoOptions(addr, clientID string) *paho.ClientOptions {
	return paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(clientID).
		SetProtocolVersion(4).SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetKeepAlive(60 * time.Second).SetConnectTimeout(10 * time.Second).SetWriteTimeout(10 * time.Second)
}

// connectPlain connects a bare paho client with ClientID sn and subscribes
// to the same two filters the reference client subscribes to after every
// login (key topic, then downlink data, both QoS 1). Without m2m1 it sends
// no credentials (for the allow-all baseline); with m2m1 it logs in with an
// M2M1 token (with sessionKey: flag 01 and the bkd, then it waits for the
// platform's key message, which it does not unwrap). It measures the
// broker's cost without the reference client's own. tune, if any, changes
// the paho options last (the storm's source address and lost handler).
func connectPlain(ctx context.Context, addr string, t *Terminal, m2m1, sessionKey bool, tune ...func(*paho.ClientOptions)) (benchConn, error) {
	o := pahoOptions(addr, t.ID.SN)
	for _, f := range tune {
		f(o)
	}
	if m2m1 {
		pw, err := loginPassword(t, sessionKey)
		if err != nil {
			return nil, err
		}
		o.SetUsername(t.ID.Username()).SetPassword(pw)
	}
	pc := paho.NewClient(o)
	if err := wait(ctx, pc.Connect()); err != nil {
		// ctx may end first: without this, paho would go on
		// connecting, and a late CONNACK would leave a client behind
		// that takes the terminal's session over from its next attempt.
		pc.Disconnect(0)
		return nil, err
	}
	key := make(chan struct{})
	var once sync.Once
	onKey := func(paho.Client, paho.Message) { once.Do(func() { close(key) }) }
	for _, f := range []string{codec.KeyTopic(t.ID.SN), codec.DownTopic(t.ID.SN, "#")} {
		if err := wait(ctx, pc.Subscribe(f, 1, onKey)); err != nil {
			pc.Disconnect(0)
			return nil, err
		}
	}
	if m2m1 && sessionKey {
		select {
		case <-key:
		case <-ctx.Done():
			pc.Disconnect(0)
			return nil, fmt.Errorf("no key message: %w", ctx.Err())
		}
	}
	return &plainConn{pc: pc, topic: codec.UpTopic(t.ID.SN, "data")}, nil
}

func wait(ctx context.Context, tok paho.Token) error {
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// connectTerminal logs t in with the reference client.
func connectTerminal(ctx context.Context, addr string, t *Terminal, sessionKey bool) (benchConn, error) {
	c, err := client.New(client.Config{
		Brokers:  []string{"tcp://" + addr},
		Identity: t.ID, Alg: codec.HS256,
		Store:        client.NewMemStore(t.Record()),
		SessionKey:   sessionKey,
		CleanSession: true,
		KeepAlive:    60 * time.Second, ConnectTimeout: 10 * time.Second, KeyTimeout: 10 * time.Second,
	})
	if err != nil {
		return nil, err
	}
	if err := c.Connect(ctx); err != nil {
		c.Close()
		return nil, err
	}
	if sessionKey && !c.Session().Encrypted {
		c.Close()
		return nil, errors.New("no session key issued")
	}
	return &termConn{c: c}, nil
}

// loginPassword returns a fresh M2M1 login token for t.
func loginPassword(t *Terminal, sessionKey bool) (string, error) {
	var n [8]byte
	rand.Read(n[:])
	l := codec.Login{Identity: t.ID, Alg: codec.HS256, TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(n[:]))}
	if sessionKey {
		l.Flags, l.BKD = codec.FlagSessionKey, codec.BasicKeyDigest(codec.HS256, t.BK, codec.Never)
	}
	pw, err := l.Sign(t.Up)
	return string(pw), err
}

// The CONNACK-only kinds: a bare paho client sends an M2M1 CONNECT
// without a session key and the attempt ends at the CONNACK; an accepted
// one disconnects at once, without subscribing, so that accepting and
// refusing cost the client the same work.
var connackKinds = map[string]string{
	"accept-connack":   "", // a genuine login, accepted
	"refuse-digest":    "bad-digest",
	"refuse-unknown":   "unknown-terminal",
	"refuse-throttled": "throttled",
}

// refusalReason returns the hook's refusal reason (the reason label of
// m2mguard_logins_total) that kind's logins must get, "" for the kinds
// whose logins are accepted.
func refusalReason(kind string) string { return connackKinds[kind] }

// isConnackKind reports whether kind is one of the CONNACK-only kinds.
func isConnackKind(kind string) bool {
	_, ok := connackKinds[kind]
	return ok
}

// errAccepted is the outcome of a refusal kind's login that the broker
// accepted.
var errAccepted = errors.New("login accepted, a refusal expected")

// unknownTerminal returns t under a serial number of the same length that
// no store holds; its login token has the same shape as t's.
func unknownTerminal(t *Terminal) *Terminal {
	u := *t
	u.ID.SN = "UNKNOWN" + t.ID.SN[len("UNKNOWN"):]
	return &u
}

// connackOnce sends one CONNECT of kind (a CONNACK-only kind) for t with a
// bare paho client and waits for the CONNACK. It returns nil when the
// answer is the one kind expects: an accepted login (which it then
// disconnects), or a refusal (paho's "not Authorized": MQTT 3.1.1 has one
// return code for every refusal). A refusal kind's accepted login is
// errAccepted.
func connackOnce(ctx context.Context, addr string, t *Terminal, kind string) error {
	refuse := kind != "accept-connack"
	if kind == "refuse-unknown" {
		t = unknownTerminal(t)
	}
	pw, err := loginPassword(t, false)
	if err != nil {
		return err
	}
	if kind == "refuse-digest" {
		pw = string(badDigest(pw))
	}
	pc := paho.NewClient(pahoOptions(addr, t.ID.SN).SetUsername(t.ID.Username()).SetPassword(pw))
	err = wait(ctx, pc.Connect())
	switch {
	case err == nil:
		pc.Disconnect(0)
		if refuse {
			return errAccepted
		}
		return nil
	case refuse && errors.Is(err, pahopackets.ErrorRefusedNotAuthorised):
		return nil
	}
	// A timeout, or ctx's end: without this paho would go on, and a
	// late CONNACK would leave a client behind.
	pc.Disconnect(0)
	return err
}

// primeThrottle fails the login of each of terms free times from this
// address (wrong digests), so that each (sn, address) pair enters a
// refusal period of the broker's throttle, then checks that one more
// genuine login of each is refused. It returns an error unless every
// attempt was refused.
func primeThrottle(ctx context.Context, cfg *LoadConfig, terms []*Terminal, free int) error {
	errs := &errList{}
	for pass := range free + 1 {
		kind := "refuse-digest"
		if pass == free {
			kind = "refuse-throttled" // a genuine token: refused only by the throttle
		}
		var next atomic.Int64
		var wg sync.WaitGroup
		for range cfg.Concurrency {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(next.Add(1) - 1)
					if i >= len(terms) || ctx.Err() != nil {
						return
					}
					cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
					if err := connackOnce(cctx, cfg.Addr, terms[i], kind); err != nil {
						errs.add("%s: attempt %d: %v", terms[i].ID.SN, pass+1, err)
					}
					cancel()
				}
			}()
		}
		wg.Wait()
		if err := ctx.Err(); err != nil {
			return err
		}
	}
	if errs.n > 0 {
		return fmt.Errorf("throttle priming: %d attempts not refused, first: %s", errs.n, errs.errs[0])
	}
	cfg.progress("throttle: %d terminals failed %d times each, one more genuine login of each refused", len(terms), free)
	return nil
}

// connectRTT measures one CONNECT→CONNACK (TCP set-up included) with a
// bare paho client: M2M1 credentials for the terminal kind, none for plain.
func connectRTT(ctx context.Context, cfg *LoadConfig, t *Terminal) (time.Duration, error) {
	if isConnackKind(cfg.Kind) {
		// The kind's own CONNECT→CONNACK, refusals included.
		start := time.Now()
		err := connackOnce(ctx, cfg.Addr, t, cfg.Kind)
		return time.Since(start), err
	}
	o := pahoOptions(cfg.Addr, t.ID.SN)
	if cfg.Kind != "plain" {
		pw, err := loginPassword(t, false)
		if err != nil {
			return 0, err
		}
		o.SetUsername(t.ID.Username()).SetPassword(pw)
	}
	pc := paho.NewClient(o)
	start := time.Now()
	err := wait(ctx, pc.Connect())
	d := time.Since(start)
	if err == nil {
		pc.Disconnect(0)
	}
	return d, err
}

type errList struct {
	mu   sync.Mutex
	errs []string
	n    int
}

func (e *errList) add(format string, args ...any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.n++
	if len(e.errs) < 10 {
		e.errs = append(e.errs, fmt.Sprintf(format, args...))
	}
}

func (c *LoadConfig) progress(format string, args ...any) {
	if c.Progress != nil {
		fmt.Fprintf(c.Progress, format+"\n", args...)
	}
}

// RunLoad runs the RTT samples, the connect storm and the publish load, then
// disconnects every client.
func RunLoad(ctx context.Context, cfg LoadConfig) (*LoadResult, error) {
	if cfg.N > len(cfg.Terminals) {
		return nil, fmt.Errorf("%d terminals asked, %d available", cfg.N, len(cfg.Terminals))
	}
	switch {
	case cfg.Kind == "plain", cfg.Kind == "m2m1", cfg.Kind == "terminal", isConnackKind(cfg.Kind):
	default:
		return nil, fmt.Errorf("unknown kind %q (plain, m2m1, terminal, accept-connack, refuse-digest, refuse-unknown or refuse-throttled)", cfg.Kind)
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 1
	}
	if cfg.PayloadSize < 8 {
		cfg.PayloadSize = 8
	}
	connackOnly := isConnackKind(cfg.Kind)
	if connackOnly {
		cfg.SessionKey, cfg.Duration = false, 0
	}
	res := &LoadResult{Kind: cfg.Kind, SessionKey: cfg.SessionKey && cfg.Kind != "plain", Addr: cfg.Addr, N: cfg.N}
	errs := &errList{}

	// 0. refuse-throttled: the first N terminals into a refusal period.
	rttTerms := len(cfg.Terminals)
	if cfg.Kind == "refuse-throttled" {
		free := cfg.ThrottleFree
		if free <= 0 {
			free = hook.DefaultThrottleOptions().Free
		}
		if err := primeThrottle(ctx, &cfg, cfg.Terminals[:cfg.N], free); err != nil {
			return nil, err
		}
		rttTerms = cfg.N // only these are throttled
	}

	// 1. Sequential CONNECT round trips, nothing else in flight.
	var rtts []time.Duration
	for i := 0; i < cfg.RTTSamples && i < rttTerms; i++ {
		d, err := connectRTT(ctx, &cfg, cfg.Terminals[i])
		if err != nil {
			errs.add("rtt %s: %v", cfg.Terminals[i].ID.SN, err)
			continue
		}
		rtts = append(rtts, d)
	}
	res.RTT = stats.Summarize(rtts)
	if cfg.RTTSamples > 0 {
		cfg.progress("rtt: %d samples, p50 %.3f ms", res.RTT.N, res.RTT.P50)
	}

	// 2. The connect storm.
	conns := make([]benchConn, cfg.N) // nil for the CONNACK-only kinds
	ok := make([]bool, cfg.N)         // the attempt succeeded (connackOnce: the expected answer)
	lat := make([]time.Duration, cfg.N)
	var next, done atomic.Int64
	var wg sync.WaitGroup
	stopProgress := make(chan struct{})
	if cfg.BeforeStorm != nil {
		cfg.BeforeStorm()
	}
	cpu0 := processCPU()
	start := time.Now()
	go func() {
		tk := time.NewTicker(time.Second)
		defer tk.Stop()
		for {
			select {
			case <-tk.C:
				n := done.Load()
				cfg.progress("connect: %d/%d (%.0f/s)", n, cfg.N, float64(n)/time.Since(start).Seconds())
			case <-stopProgress:
				return
			}
		}
	}()
	for range cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= cfg.N || ctx.Err() != nil {
					return
				}
				t := cfg.Terminals[i]
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				t0 := time.Now()
				var c benchConn
				var err error
				switch {
				case connackOnly:
					err = connackOnce(cctx, cfg.Addr, t, cfg.Kind)
				case cfg.Kind == "terminal":
					c, err = connectTerminal(cctx, cfg.Addr, t, cfg.SessionKey)
				default:
					c, err = connectPlain(cctx, cfg.Addr, t, cfg.Kind == "m2m1", cfg.SessionKey)
				}
				lat[i] = time.Since(t0)
				cancel()
				if err != nil {
					errs.add("connect %s: %v", t.ID.SN, err)
				} else {
					conns[i], ok[i] = c, true
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu := processCPU() - cpu0
	close(stopProgress)
	var okLat []time.Duration
	var live []benchConn
	for i, c := range conns {
		if ok[i] {
			okLat = append(okLat, lat[i])
		}
		if c != nil {
			live = append(live, c)
		}
	}
	n := len(okLat)
	res.Connect = ConnectResult{Attempted: cfg.N, Connected: n, Failed: cfg.N - n,
		Seconds: elapsed.Seconds(), PerSec: float64(n) / elapsed.Seconds(), Latency: stats.Summarize(okLat)}
	if n > 0 {
		res.Connect.ClientCPUPerConn = float64(cpu.Microseconds()) / float64(n)
	}
	cfg.progress("connect: %d connected, %d failed in %.2fs: %.0f/s, p50 %.2f ms p99 %.2f ms",
		res.Connect.Connected, res.Connect.Failed, res.Connect.Seconds, res.Connect.PerSec, res.Connect.Latency.P50, res.Connect.Latency.P99)
	if cfg.AfterConnect != nil {
		cfg.AfterConnect()
	}

	// 3. Steady publish load.
	if cfg.Duration > 0 && len(live) > 0 {
		pr, err := publishLoad(ctx, &cfg, live, errs)
		if err != nil {
			errs.add("publish: %v", err)
		}
		res.Publish = pr
	}

	closeAll(live)
	res.Errors = errs.errs
	if errs.n > len(errs.errs) {
		res.Errors = append(res.Errors, fmt.Sprintf("... %d errors in all", errs.n))
	}
	return res, nil
}

// closeAll disconnects conns, many at a time.
func closeAll(conns []benchConn) {
	ch := make(chan benchConn)
	var wg sync.WaitGroup
	for range 256 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range ch {
				c.close()
			}
		}()
	}
	for _, c := range conns {
		ch <- c
	}
	close(ch)
	wg.Wait()
}

// publishLoad has cfg.Publishers of conns publish back to back for
// cfg.Duration while an application subscriber counts what arrives.
func publishLoad(ctx context.Context, cfg *LoadConfig, conns []benchConn, errs *errList) (*PublishResult, error) {
	var (
		mu       sync.Mutex
		e2e      []time.Duration
		received atomic.Int64
		counting atomic.Bool
	)
	var id [6]byte
	rand.Read(id[:])
	owner := "bench-app" // an application's ClientID is its name followed by '-' and anything
	if cfg.AppUser != "" {
		owner = cfg.AppUser
	}
	o := pahoOptions(cfg.Addr, owner+"-"+hex.EncodeToString(id[:]))
	if cfg.AppUser != "" {
		o.SetUsername(cfg.AppUser).SetPassword(cfg.AppPassword)
	}
	o.SetOrderMatters(false)
	app := paho.NewClient(o)
	if err := wait(ctx, app.Connect()); err != nil {
		return nil, fmt.Errorf("application subscriber: %w", err)
	}
	defer app.Disconnect(0)
	if err := wait(ctx, app.Subscribe("m2m/+/up/#", 0, func(_ paho.Client, m paho.Message) {
		p := m.Payload()
		if !counting.Load() || len(p) < 8 {
			return
		}
		d := time.Duration(time.Now().UnixNano() - int64(binary.BigEndian.Uint64(p)))
		received.Add(1)
		mu.Lock()
		e2e = append(e2e, d)
		mu.Unlock()
	})); err != nil {
		return nil, fmt.Errorf("application subscribe: %w", err)
	}

	pubs := cfg.Publishers
	if pubs <= 0 || pubs > len(conns) {
		pubs = len(conns)
	}
	var sent atomic.Int64
	pubLat := make([][]time.Duration, pubs)
	pctx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	counting.Store(true)
	start := time.Now()
	go func() {
		tk := time.NewTicker(time.Second)
		defer tk.Stop()
		for {
			select {
			case <-tk.C:
				cfg.progress("publish: sent %d received %d (%.0f/s)", sent.Load(), received.Load(), float64(received.Load())/time.Since(start).Seconds())
			case <-pctx.Done():
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for p := range pubs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			payload := make([]byte, cfg.PayloadSize)
			for pctx.Err() == nil {
				t0 := time.Now()
				binary.BigEndian.PutUint64(payload, uint64(t0.UnixNano()))
				err := conns[p].publish(pctx, payload, cfg.QoS)
				if err != nil {
					if pctx.Err() == nil {
						errs.add("publish: %v", err)
						time.Sleep(10 * time.Millisecond)
					}
					continue
				}
				sent.Add(1)
				pubLat[p] = append(pubLat[p], time.Since(t0))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	// Messages still in flight count for the end-to-end latency, not for
	// the rate: the rate is what arrived inside the window.
	inWindow := received.Load()
	time.Sleep(500 * time.Millisecond)
	counting.Store(false)
	var all []time.Duration
	for _, l := range pubLat {
		all = append(all, l...)
	}
	mu.Lock()
	e := append([]time.Duration(nil), e2e...)
	mu.Unlock()
	r := &PublishResult{Publishers: pubs, QoS: cfg.QoS, PayloadBytes: cfg.PayloadSize, Seconds: elapsed.Seconds(),
		Sent: sent.Load(), Received: received.Load(), PerSec: float64(inWindow) / elapsed.Seconds(),
		Publish: stats.Summarize(all), EndToEnd: stats.Summarize(e)}
	cfg.progress("publish: %d sent, %d received, %.0f msg/s end to end, e2e p50 %.2f ms p99 %.2f ms",
		r.Sent, r.Received, r.PerSec, r.EndToEnd.P50, r.EndToEnd.P99)
	return r, nil
}

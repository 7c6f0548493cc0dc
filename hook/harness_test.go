package hook_test

import (
	"crypto/rand"
	"encoding/base64"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/mochifix"
	"github.com/m2mguard/m2mguard/internal/syncbuf"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

// passwordLifetime is the life of the passwords the test key service
// generates.
const passwordLifetime = 30 * 24 * time.Hour

// env is a real mochi broker with the hook on a loopback port, backed by the
// key service on the embedded store.
type env struct {
	t       testing.TB
	svc     *keysvc.Service
	server  *mqtt.Server
	hook    *hook.Hook
	addr    string // host:port
	logs    *syncbuf.Buffer
	metrics *prometheus.Registry
	clock   *clock
	secrets [][]byte // every secret handed out, for the log scan

	stopServer func()
}

type clock struct{ offset atomic.Int64 }

func (c *clock) now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *clock) advance(d time.Duration) { c.offset.Add(int64(d)) }

func newEnv(t *testing.T, tune func(*hook.Options)) *env {
	t.Helper()
	return newEnvWith(t, nil, tune)
}

func newEnvWith(t *testing.T, tuneSvc func(*keysvc.Options), tune func(*hook.Options)) *env {
	t.Helper()
	return newEnvOn(t, embedded(t), tuneSvc, tune)
}

// embedded opens a fresh embedded store in the test's temporary folder,
// without an fsync per commit (no test here crashes the machine).
func embedded(t testing.TB) keysvc.Store {
	t.Helper()
	key := make([]byte, 32)
	rand.Read(key)
	store, err := boltstore.Open(filepath.Join(t.TempDir(), "m2mguard.db"), boltstore.Options{MasterKey: key, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	return store
}

// newEnvOn starts a broker with the hook on store.
func newEnvOn(t testing.TB, store keysvc.Store, tuneSvc func(*keysvc.Options), tune func(*hook.Options)) *env {
	t.Helper()
	e := &env{t: t, logs: &syncbuf.Buffer{}, clock: &clock{}}
	e.start(store, tuneSvc, tune)
	t.Cleanup(e.scanLogs)
	return e
}

// start (re)starts the key service, mochi and the hook on store.
func (e *env) start(store keysvc.Store, tuneSvc func(*keysvc.Options), tune func(*hook.Options)) {
	t := e.t
	t.Helper()
	e.metrics = prometheus.NewRegistry()
	svcOpts := keysvc.Options{
		Store: store, Now: e.clock.now, PasswordLifetime: passwordLifetime,
		AppHash: keysvc.AppHashParams{Time: 1, Memory: 1024},
	}
	if tuneSvc != nil {
		tuneSvc(&svcOpts)
	}
	var err error
	e.svc, err = keysvc.New(svcOpts)
	if err != nil {
		t.Fatal(err)
	}
	// mochi's own log, at debug level, goes to the same buffer: the secret
	// scan covers it too.
	e.server = mqtt.New(&mqtt.Options{InlineClient: true,
		Logger: slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	opts := hook.Options{
		Registry: e.svc, Server: e.server, Now: e.clock.now, Registerer: e.metrics,
		Logger:   slog.New(slog.NewJSONHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Throttle: hook.ThrottleOptions{Free: 3, Base: time.Hour},
		// Tests log applications in back to back; the flood tests set
		// the production budgets.
		Apps: hook.AppLimitOptions{Rate: 1e6, RatePerAddr: 1e6, FailuresPerAddr: 1e6},
	}
	if tune != nil {
		tune(&opts)
	}
	e.hook, err = hook.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.server.AddHook(e.hook, nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tl := &trackingListener{Listener: ln}
	if err := e.server.AddListener(listeners.NewNet("tcp", tl)); err != nil {
		t.Fatal(err)
	}
	go e.server.Serve()
	var once sync.Once
	server := e.server
	e.stopServer = func() {
		once.Do(func() {
			// As a killed process would: every socket drops at once. Then
			// close without mochi's deadlock (mochi-mqtt/server#488).
			tl.closeConns()
			mochifix.Close(server, []string{"tcp"}, 10*time.Second)
		})
	}
	t.Cleanup(e.stopServer)
	e.addr = ln.Addr().String()
}

// trackingListener remembers the connections it accepted, so that a test
// can drop them all as a killed broker would.
type trackingListener struct {
	net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.conns = append(l.conns, c)
		l.mu.Unlock()
	}
	return c, err
}

func (l *trackingListener) closeConns() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		c.Close()
	}
	l.conns = nil
}

// stop kills the broker: every connection drops, nothing is flushed.
func (e *env) stop() { e.stopServer() }

// scanLogs fails the test if any secret handed out appears in the logs
// (the hook's security events and mochi's own debug log).
func (e *env) scanLogs() {
	if n := e.leaks(); n > 0 {
		e.t.Errorf("%d secrets appear in the log output", n)
	}
}

// leaks counts the occurrences of secrets in the logs and metrics, as bytes, hex or
// base64, in one pass over the logs (strings.Replacer matches all the
// patterns at once with a trie).
func (e *env) leaks() int {
	const mark = "\x00LEAK\x00"
	var pairs []string
	for _, s := range e.secrets {
		if len(s) < 8 {
			continue
		}
		pairs = append(pairs, string(s), mark, fmtHex(s), mark,
			base64.StdEncoding.EncodeToString(s)[:10], mark, base64.RawURLEncoding.EncodeToString(s)[:10], mark)
	}
	if len(pairs) == 0 {
		return 0
	}
	return strings.Count(strings.NewReplacer(pairs...).Replace(e.logs.String()+e.metricsText()), mark)
}

// metricsText is every metric name, label and value the hook exports.
func (e *env) metricsText() string {
	mfs, err := e.metrics.Gather()
	if err != nil {
		return ""
	}
	var b strings.Builder
	for _, mf := range mfs {
		b.WriteString(mf.String())
	}
	return b.String()
}

func fmtHex(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&15])
	}
	return string(out)
}

// register adds a terminal and returns the terminal as SPEC sees it.
func (e *env) register(sn string, alg codec.Alg, tune ...func(*keysvc.RegisterRequest)) specTerminal {
	e.t.Helper()
	req := keysvc.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120", Alg: alg}
	for _, f := range tune {
		f(&req)
	}
	term, err := e.svc.Register(e.t.Context(), req)
	if err != nil {
		e.t.Fatalf("register %s: %v", sn, err)
	}
	return e.spec(term)
}

func (e *env) spec(term *keysvc.Terminal) specTerminal {
	e.secrets = append(e.secrets, term.Creds.Up, term.Creds.Down, term.Creds.BK)
	return specTerminal{
		sn: term.SN, imei: term.IMEI, imsi: term.IMSI, alg: term.Alg.String(),
		up: string(term.Creds.Up), down: string(term.Creds.Down), bk: term.Creds.BK, bkexp: term.Creds.BKExp,
	}
}

// login returns a fresh password for now.
func (e *env) login(term specTerminal, wantKey bool) []byte {
	var n [8]byte
	rand.Read(n[:])
	nonce := uint64(n[0])<<56 | uint64(n[1])<<48 | uint64(n[2])<<40 | uint64(n[3])<<32 | uint64(n[4])<<24 | uint64(n[5])<<16 | uint64(n[6])<<8 | uint64(n[7])
	return []byte(term.password(wantKey, uint32(e.clock.now().Unix()), nonce))
}

// pahoConnect connects a 3.1.1 paho client and returns it with the CONNACK
// return code.
func (e *env) pahoConnect(clientID, username string, password []byte, clean bool, onMsg paho.MessageHandler) (paho.Client, byte) {
	e.t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + e.addr).SetClientID(clientID).
		SetUsername(username).SetPassword(string(password)).SetCleanSession(clean).
		SetAutoReconnect(false).SetConnectRetry(false).SetProtocolVersion(4).
		SetConnectTimeout(5 * time.Second).SetDefaultPublishHandler(onMsg)
	c := paho.NewClient(o)
	tok := c.Connect()
	tok.WaitTimeout(5 * time.Second)
	ct := tok.(*paho.ConnectToken)
	if ct.ReturnCode() == 0 && tok.Error() == nil {
		e.t.Cleanup(func() { c.Disconnect(50) })
	}
	return c, ct.ReturnCode()
}

// addApp registers an application with the default reach.
func (e *env) addApp(name string) []byte {
	e.t.Helper()
	pw := []byte("app-password-" + name)
	if _, err := e.svc.AddApp(e.t.Context(), keysvc.AddAppRequest{Name: name, Password: pw}); err != nil {
		e.t.Fatalf("add app: %v", err)
	}
	e.secrets = append(e.secrets, pw)
	return pw
}

// counter returns the sum of the counters name with the given labels
// (pairs of label name and value).
func (e *env) counter(name string, labels ...string) float64 {
	e.t.Helper()
	v, _ := e.metric(name, labels...)
	return v
}

// gauge returns the sum of the gauges name with the given labels.
func (e *env) gauge(name string, labels ...string) float64 {
	e.t.Helper()
	v, _ := e.metric(name, labels...)
	return v
}

// metric returns the sum of the counters or gauges name with the given
// labels, and whether the hook exports name at all.
func (e *env) metric(name string, labels ...string) (total float64, exported bool) {
	e.t.Helper()
	mfs, err := e.metrics.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		exported = true
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					found = found || lp.GetName() == labels[i] && lp.GetValue() == labels[i+1]
				}
				if !found {
					continue next
				}
			}
			total += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return total, exported
}

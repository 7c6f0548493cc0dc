package adminapi_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

const (
	adminToken   = "adminapi-test-token-0123456789"
	metricsToken = "adminapi-metrics-token-0123456789"
)

// startBroker starts a real broker (embedded store) with its admin API on
// a loopback port and returns the broker and the API's base URL.
func startBroker(t *testing.T) (*broker.Broker, string) {
	t.Helper()
	b, base, err := start(filepath.Join(t.TempDir(), "data"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b, base
}

// start starts a broker on dataDir with the test tokens.
func start(dataDir string) (*broker.Broker, string, error) {
	cfg := broker.Default()
	cfg.DataDir = dataDir
	cfg.MQTT.TCP, cfg.MQTT.WS, cfg.Admin.Listen = "127.0.0.1:0", "", "127.0.0.1:0"
	cfg.Admin.Token, cfg.Admin.MetricsToken = adminToken, metricsToken
	b, err := broker.Start(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		return nil, "", err
	}
	return b, "http://" + b.Addr("admin"), nil
}

func newClient(t *testing.T, base, token string, opts *adminapi.Options) *adminapi.Client {
	t.Helper()
	c, err := adminapi.New(base, token, opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// apiError returns err as an *adminapi.Error, failing the test if it is not one.
func apiError(t *testing.T, err error) *adminapi.Error {
	t.Helper()
	var ae *adminapi.Error
	if !errors.As(err, &ae) {
		t.Fatalf("error %v (%T) is no *adminapi.Error", err, err)
	}
	return ae
}

// wantIs fails the test unless errors.Is(err, target).
func wantIs(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: error %v, want one matching %v", what, err, target)
	}
}

var t1 = adminapi.RegisterRequest{SN: "T1", IMEI: "354494040518570", IMSI: "460020084678120"}

// TestTerminals drives every terminal endpoint of a real broker through
// the client.
func TestTerminals(t *testing.T) {
	_, base := startBroker(t)
	c := newClient(t, base, adminToken, nil)
	ctx := context.Background()

	b, err := c.Register(ctx, t1)
	if err != nil {
		t.Fatal(err)
	}
	if b.SN != "T1" || len(b.Up) != 16 || len(b.BK) != 64 || b.Alg != "hs256" || b.UpExp != adminapi.Never || !strings.HasPrefix(b.BrokerURL, "tcp://") {
		t.Fatalf("bundle %+v", b)
	}
	_, err = c.Register(ctx, t1)
	wantIs(t, "duplicate", err, adminapi.ErrConflict)
	if ae := apiError(t, err); ae.Status != http.StatusConflict || ae.Field != "sn" || ae.Message != "terminal T1 already exists" {
		t.Fatalf("duplicate: %+v", ae)
	}
	_, err = c.Register(ctx, adminapi.RegisterRequest{SN: "T2", IMEI: "12", IMSI: "460020084678121"})
	wantIs(t, "bad imei", err, adminapi.ErrBadRequest)
	if ae := apiError(t, err); ae.Field != "imei" || !strings.HasPrefix(ae.Error(), "imei: ") || !strings.HasSuffix(ae.Error(), "(HTTP 400)") {
		t.Fatalf("bad imei: %q, field %q", ae.Error(), ae.Field)
	}

	got, err := c.GetTerminal(ctx, "T1")
	if err != nil || got.Status != "active" || got.IMEI != t1.IMEI {
		t.Fatalf("get: %+v %v", got, err)
	}
	_, err = c.GetTerminal(ctx, "T9")
	wantIs(t, "get unknown", err, adminapi.ErrNotFound)

	for _, r := range []adminapi.RegisterRequest{
		{SN: "T2", IMEI: "354494040518571", IMSI: "460020084678121", Alg: "md5"},
		{SN: "T3", IMEI: "354494040518572", IMSI: "460020084678122"},
	} {
		if _, err := c.Register(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	page, err := c.ListTerminals(ctx, "", 2)
	if err != nil || len(page.Terminals) != 2 || page.Next != "T2" {
		t.Fatalf("page 1: %+v %v", page, err)
	}
	page, err = c.ListTerminals(ctx, page.Next, 2)
	if err != nil || len(page.Terminals) != 1 || page.Terminals[0].SN != "T3" || page.Next != "" {
		t.Fatalf("page 2: %+v %v", page, err)
	}
	_, err = c.ListTerminals(ctx, "", 5000)
	wantIs(t, "limit too large", err, adminapi.ErrBadRequest)
	var all []string
	for term, err := range c.AllTerminals(ctx, 1) {
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, term.SN)
	}
	if !slices.Equal(all, []string{"T1", "T2", "T3"}) {
		t.Fatalf("AllTerminals: %v", all)
	}
	for term := range c.AllTerminals(ctx, 1) { // a break stops the fetching
		if term.SN != "T1" {
			t.Fatalf("first: %+v", term)
		}
		break
	}

	if got, err := c.DisableTerminal(ctx, "T3"); err != nil || got.Status != "disabled" {
		t.Fatalf("disable: %+v %v", got, err)
	}
	if got, err := c.EnableTerminal(ctx, "T3"); err != nil || got.Status != "active" {
		t.Fatalf("enable: %+v %v", got, err)
	}
	_, err = c.DisableTerminal(ctx, "T9")
	wantIs(t, "disable unknown", err, adminapi.ErrNotFound)

	ch, err := c.StartChange(ctx, "T2", "pwd")
	if err != nil || ch.What != "pwd" || ch.Origin != "operator" || ch.RID == "" {
		t.Fatalf("change: %+v %v", ch, err)
	}
	_, err = c.StartChange(ctx, "T2", "all")
	wantIs(t, "busy", err, adminapi.ErrConflict)
	_, err = c.StartChange(ctx, "T2", "everything")
	wantIs(t, "bad what", err, adminapi.ErrBadRequest)
	if pending, err := c.PendingChange(ctx, "T2"); err != nil || pending.RID != ch.RID {
		t.Fatalf("pending: %+v %v", pending, err)
	}
	_, err = c.PendingChange(ctx, "T1")
	wantIs(t, "none pending", err, adminapi.ErrNotFound)

	fresh, err := c.RekeyTerminal(ctx, "T1")
	if err != nil || fresh.Up == b.Up || fresh.BK == b.BK {
		t.Fatalf("rekey: %v", err)
	}
	if err := c.DeleteTerminal(ctx, "T3"); err != nil {
		t.Fatal(err)
	}
	wantIs(t, "delete again", c.DeleteTerminal(ctx, "T3"), adminapi.ErrNotFound)
}

func TestImport(t *testing.T) {
	_, base := startBroker(t)
	c := newClient(t, base, adminToken, nil)
	ctx := context.Background()
	csv := "sn,imei,imsi\n" +
		"I1,354494040518570,460020084678120\n" +
		"I1,354494040518571,460020084678121\n" // duplicate
	var progress []adminapi.Progress
	rep, err := c.ImportTerminals(ctx, strings.NewReader(csv), func(p adminapi.Progress) { progress = append(progress, p) })
	if err != nil {
		t.Fatal(err)
	}
	if rep.Rows != 2 || rep.Created != 1 || len(rep.Rejected) != 1 || rep.Rejected[0].Line != 3 {
		t.Fatalf("report %+v", rep)
	}
	if len(progress) == 0 || progress[len(progress)-1] != (adminapi.Progress{Done: 2, Total: 2}) {
		t.Fatalf("progress %+v", progress)
	}
	_, err = c.ImportTerminals(ctx, strings.NewReader("serial,imei\nA,1\n"), nil)
	wantIs(t, "bad header", err, adminapi.ErrBadRequest)
	if _, err := c.GetTerminal(ctx, "I1"); err != nil {
		t.Fatal(err)
	}
}

// TestSessionsAndApps: an application connects with paho and is listed,
// then disconnected.
func TestSessionsAndApps(t *testing.T) {
	b, base := startBroker(t)
	c := newClient(t, base, adminToken, nil)
	ctx := context.Background()

	app, err := c.AddApp(ctx, adminapi.AppRequest{Name: "dash"})
	if err != nil || len(app.Password) != 24 || !slices.Equal(app.Subscribe, []string{"m2m/+/up/#"}) {
		t.Fatalf("add app: %+v %v", app, err)
	}
	_, err = c.AddApp(ctx, adminapi.AppRequest{Name: "dash-x"})
	wantIs(t, "overlapping name", err, adminapi.ErrConflict)
	_, err = c.AddApp(ctx, adminapi.AppRequest{Name: "ops", Password: "short"})
	if ae := apiError(t, err); ae.Field != "password" {
		t.Fatalf("short password: %+v", ae)
	}
	if apps, err := c.Apps(ctx); err != nil || !slices.Equal(apps, []string{"dash"}) {
		t.Fatalf("apps: %v %v", apps, err)
	}
	if got, err := c.GetApp(ctx, "dash"); err != nil || got.Password != "" || got.Name != "dash" {
		t.Fatalf("get app: %+v %v", got, err)
	}

	o := paho.NewClientOptions().AddBroker("tcp://" + b.Addr("tcp")).SetClientID("dash-a/b").
		SetUsername("dash").SetPassword(app.Password).SetAutoReconnect(false).SetConnectRetry(false)
	mc := paho.NewClient(o)
	if tok := mc.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("the application's connect: %v", tok.Error())
	}
	defer mc.Disconnect(0)
	listed := func() []adminapi.Session {
		ss, err := c.Sessions(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return ss
	}
	if !testwait.Until(10*time.Second, func() bool { return len(listed()) == 1 }) {
		t.Fatalf("sessions: %+v", listed())
	}
	if s := listed()[0]; s.ClientID != "dash-a/b" || s.Kind != "application" || s.App != "dash" || s.Protocol != 4 {
		t.Fatalf("session %+v", s)
	}
	if err := c.Disconnect(ctx, "dash-a/b"); err != nil { // a "/" in a ClientID stays in its path segment
		t.Fatal(err)
	}
	if !testwait.Until(10*time.Second, func() bool { return len(listed()) == 0 && !mc.IsConnected() }) {
		t.Fatalf("still connected: %+v", listed())
	}
	// ClientIDs the server would clean out of a path reach the endpoint too.
	for _, id := range []string{"nobody", ".", "..", "a b", "%2F", "x?y#z"} {
		err := c.Disconnect(ctx, id)
		wantIs(t, "disconnect "+id, err, adminapi.ErrNotFound)
		if ae := apiError(t, err); ae.Message != "no connected client "+id {
			t.Errorf("disconnect %q: %q, want the endpoint's answer", id, ae.Message)
		}
	}

	if err := c.RemoveApp(ctx, "dash"); err != nil {
		t.Fatal(err)
	}
	wantIs(t, "remove again", c.RemoveApp(ctx, "dash"), adminapi.ErrNotFound)
	_, err = c.GetApp(ctx, "dash")
	wantIs(t, "get removed", err, adminapi.ErrNotFound)
}

// TestHealthMetricsAndTokens: /healthz needs no token; /metrics takes the
// metrics token; neither that one nor a wrong one reads the rest.
func TestHealthMetricsAndTokens(t *testing.T) {
	b, base := startBroker(t)
	ctx := context.Background()
	anonymous := newClient(t, base, "", nil)
	if h, err := anonymous.Health(ctx); err != nil || h.Status != "ok" || h.Store != "ok" {
		t.Fatalf("health: %+v %v", h, err)
	}
	_, err := anonymous.Apps(ctx)
	wantIs(t, "no token", err, adminapi.ErrUnauthorized)

	scraper := newClient(t, base, "", &adminapi.Options{MetricsToken: metricsToken})
	_, err = scraper.GetApp(ctx, "nobody")
	wantIs(t, "the metrics token on an admin endpoint", err, adminapi.ErrUnauthorized)
	m, err := scraper.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for sample, want := range map[string]float64{
		`m2mguard_admin_requests_total{route="GET /healthz",status="200"}`:        1,
		`m2mguard_admin_requests_total{route="GET /v1/apps",status="401"}`:        1,
		`m2mguard_admin_requests_total{route="GET /v1/apps/{name}",status="401"}`: 1,
	} {
		if v, ok := m.Value(sample); !ok || v != want {
			t.Errorf("%s = %v (found %t), want %v", sample, v, ok, want)
		}
	}
	if _, ok := m.Value("go_goroutines"); !ok {
		t.Error("no go_goroutines in the scrape")
	}
	wrong := newClient(t, base, "wrong-token-0123456789", nil)
	_, err = wrong.Metrics(ctx)
	wantIs(t, "wrong token on /metrics", err, adminapi.ErrUnauthorized)
	if admin, err := newClient(t, base, adminToken, nil).Metrics(ctx); err != nil || len(admin) == 0 {
		t.Fatalf("the admin token on /metrics: %v", err)
	}

	// With the store gone, /healthz says so without its cause.
	b.Service().Store().Close()
	_, err = anonymous.Health(ctx)
	wantIs(t, "store closed", err, adminapi.ErrUnavailable)
	if ae := apiError(t, err); ae.Message != "the store does not answer" {
		t.Fatalf("health with the store closed: %+v", ae)
	}
}

// TestNotAnAdminAPI: errors that do not come from the broker. The HTML
// server is the one case a real broker cannot produce: another web server
// on the address.
func TestNotAnAdminAPI(t *testing.T) {
	ctx := context.Background()
	html := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, "<!DOCTYPE html><html><body>It works!</body></html>")
	}))
	defer html.Close()
	_, err := newClient(t, html.URL, adminToken, nil).Apps(ctx)
	wantIs(t, "html", err, adminapi.ErrNotAdminAPI)
	var nae *adminapi.NotAdminAPIError
	if !errors.As(err, &nae) || nae.ContentType != "text/html" || nae.Status != 200 || nae.Path != "/v1/apps" ||
		err.Error() != html.URL+" is not an m2mguard admin API: got text/html (HTTP 200) for GET /v1/apps" {
		t.Fatalf("html: %v", err)
	}

	// A closed port.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + l.Addr().String()
	l.Close()
	_, err = newClient(t, closed, adminToken, nil).Health(ctx)
	wantIs(t, "closed port", err, adminapi.ErrUnreachable)

	// A cancelled call: unreachable, and the cause is found too.
	_, base := startBroker(t)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = newClient(t, base, adminToken, nil).Sessions(cctx)
	wantIs(t, "cancelled", err, adminapi.ErrUnreachable)
	wantIs(t, "cancelled", err, context.Canceled)

	for _, tc := range []struct{ url, token string }{
		{"127.0.0.1:8080", adminToken},       // no scheme
		{"ftp://127.0.0.1:8080", adminToken}, // not HTTP
		{"http://", adminToken},              // no host
		{"http://127.0.0.1:8080/?x=1", adminToken},
		{"http://user:Injected@127.0.0.1:8080", adminToken}, // a password errors would show
		{"http://127.0.0.1:8080", "tok\nX-Injected: 1"},
	} {
		if _, err := adminapi.New(tc.url, tc.token, nil); err == nil || strings.Contains(err.Error(), "Injected") {
			t.Errorf("New(%q, %q) = %v, want an error without the token", tc.url, tc.token, err)
		}
	}
}

// TestStandardLibraryOnly: the package links nothing but the standard
// library (and so neither mochi nor Prometheus).
func TestStandardLibraryOnly(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go is not on PATH")
	}
	out, err := exec.Command(goBin, "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	if deps := strings.Fields(string(out)); !slices.Equal(deps, []string{"github.com/m2mguard/m2mguard/adminapi"}) {
		t.Fatalf("adminapi links %v, want the standard library only", deps)
	}
}

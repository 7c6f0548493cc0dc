package admin_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/broker/admin"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

const (
	token        = "test-token-0123456789abcdef"
	metricsToken = "metrics-token-0123456789abcdef"
)

// env is a real broker (mochi + hook + key service on the embedded store)
// with the admin API behind httptest, and a client of it.
type env struct {
	t   *testing.T
	b   *broker.Broker
	srv *httptest.Server
	api *adminapi.Client
}

func newEnv(t *testing.T) *env {
	t.Helper()
	cfg := broker.Default()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.MQTT.TCP, cfg.MQTT.WS, cfg.Admin.Listen = "127.0.0.1:0", "", ""
	b, err := broker.Start(t.Context(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return serve(t, b, admin.Options{Terminals: b.Service(), Apps: b.Service(), Sessions: b.Hook(), Registerer: b.Registry()})
}

// serve completes opts with the tokens, the broker's registry as Gatherer,
// its URL and a silent logger, and serves the API.
func serve(t *testing.T, b *broker.Broker, opts admin.Options) *env {
	t.Helper()
	opts.Token, opts.MetricsToken, opts.Gatherer = token, metricsToken, b.Registry()
	opts.BrokerURL = b.PublicURL()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	h, err := admin.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	api, err := adminapi.New(srv.URL, token, &adminapi.Options{HTTPClient: srv.Client()})
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, b: b, srv: srv, api: api}
}

// call sends a request with the token (tok "" = none) and returns the
// status and body. body is JSON-encoded unless it is a string.
func (e *env) call(tok, method, path string, body any) (int, []byte) {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		data, _ := json.Marshal(b)
		rd = bytes.NewReader(data)
	}
	req, _ := http.NewRequest(method, e.srv.URL+path, rd)
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := e.srv.Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

type step struct {
	name   string
	method string
	path   string
	body   any
	tok    string // "" = the right token; "-" = none
	status int
	field  string // the error's field, for error answers
	want   string // substring of the body
	not    string // must not be in the body
}

func (e *env) run(steps []step) {
	e.t.Helper()
	for _, s := range steps {
		tok := token
		switch s.tok {
		case "-":
			tok = ""
		case "":
		default:
			tok = s.tok
		}
		status, body := e.call(tok, s.method, s.path, s.body)
		if status != s.status {
			e.t.Errorf("%s: %s %s = %d, want %d: %s", s.name, s.method, s.path, status, s.status, body)
			continue
		}
		if status >= 400 {
			var ae adminapi.Error
			if err := json.Unmarshal(body, &ae); err != nil || ae.Message == "" {
				e.t.Errorf("%s: error body %q is not {\"error\": ...}", s.name, body)
			}
			if ae.Field != s.field {
				e.t.Errorf("%s: field = %q, want %q (%s)", s.name, ae.Field, s.field, body)
			}
		}
		if s.want != "" && !strings.Contains(string(body), s.want) {
			e.t.Errorf("%s: body %s lacks %q", s.name, body, s.want)
		}
		if s.not != "" && strings.Contains(string(body), s.not) {
			e.t.Errorf("%s: body %s contains %q", s.name, body, s.not)
		}
	}
}

var t1 = adminapi.RegisterRequest{SN: "T1", IMEI: "354494040518570", IMSI: "460020084678120"}

func TestTerminalsEndpoints(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	status, body := e.call(token, "POST", "/v1/terminals", t1)
	if status != http.StatusCreated {
		t.Fatalf("register: %d %s", status, body)
	}
	var b adminapi.Bundle
	if err := json.Unmarshal(body, &b); err != nil {
		t.Fatal(err)
	}
	if b.SN != "T1" || len(b.Up) != 16 || len(b.Down) != 16 || len(b.BK) != 64 || b.Alg != "hs256" || b.BrokerURL != e.b.PublicURL() || b.UpExp != codec.Never {
		t.Fatalf("bundle %+v", b)
	}
	e.run([]step{
		{name: "no token", method: "GET", path: "/v1/terminals/T1", tok: "-", status: 401},
		{name: "wrong token", method: "GET", path: "/v1/terminals/T1", tok: "wrong-token-0123456789", status: 401},
		{name: "healthz needs no token", method: "GET", path: "/healthz", tok: "-", status: 200, want: `"ok"`},
		{name: "metrics need a token", method: "GET", path: "/metrics", tok: "-", status: 401, not: "go_goroutines"},
		{name: "metrics refuse a wrong token", method: "GET", path: "/metrics", tok: "wrong-token-0123456789", status: 401},
		{name: "metrics with the metrics token", method: "GET", path: "/metrics", tok: metricsToken, status: 200, want: "go_goroutines"},
		{name: "metrics with the admin token", method: "GET", path: "/metrics", status: 200, want: "go_goroutines"},
		{name: "the metrics token reads nothing else", method: "GET", path: "/v1/terminals/T1", tok: metricsToken, status: 401},
		{name: "unknown endpoint", method: "GET", path: "/v1/nothing", status: 404},
		{name: "get hides secrets", method: "GET", path: "/v1/terminals/T1", status: 200, want: `"status": "active"`, not: b.Up},
		{name: "get hides bk", method: "GET", path: "/v1/terminals/T1", status: 200, not: b.BK},
		{name: "get unknown", method: "GET", path: "/v1/terminals/T9", status: 404},
		{name: "get bad sn", method: "GET", path: "/v1/terminals/no-such!", status: 400, field: "sn"},
		{name: "duplicate", method: "POST", path: "/v1/terminals", body: t1, status: 409, field: "sn"},
		{name: "bad imei", method: "POST", path: "/v1/terminals", body: adminapi.RegisterRequest{SN: "T2", IMEI: "12", IMSI: "460020084678120"}, status: 400, field: "imei"},
		{name: "bad alg", method: "POST", path: "/v1/terminals", body: adminapi.RegisterRequest{SN: "T2", IMEI: "354494040518571", IMSI: "460020084678121", Alg: "sha1"}, status: 400, field: "alg"},
		{name: "unknown field", method: "POST", path: "/v1/terminals", body: `{"sn":"T2","colour":"red"}`, status: 400, field: "colour"},
		{name: "not json", method: "POST", path: "/v1/terminals", body: `sn=T2`, status: 400, field: "body"},
		{name: "wrong type", method: "POST", path: "/v1/terminals", body: `{"sn":2}`, status: 400, field: "sn"},
		{name: "md5 terminal", method: "POST", path: "/v1/terminals", body: adminapi.RegisterRequest{SN: "T2", IMEI: "354494040518571", IMSI: "460020084678121", Alg: "md5"}, status: 201, want: `"alg": "md5"`},
		{name: "T3", method: "POST", path: "/v1/terminals", body: adminapi.RegisterRequest{SN: "T3", IMEI: "354494040518572", IMSI: "460020084678122"}, status: 201},
		{name: "page 1", method: "GET", path: "/v1/terminals?limit=2", status: 200, want: `"next": "T2"`},
		{name: "page 2", method: "GET", path: "/v1/terminals?limit=2&after=T2", status: 200, want: `"sn": "T3"`, not: `"next"`},
		{name: "bad limit", method: "GET", path: "/v1/terminals?limit=0", status: 400, field: "limit"},
		{name: "bad after", method: "GET", path: "/v1/terminals?after=a-b", status: 400, field: "after"},
		{name: "disable", method: "POST", path: "/v1/terminals/T3/disable", status: 200, want: `"status": "disabled"`},
		{name: "enable", method: "POST", path: "/v1/terminals/T3/enable", status: 200, want: `"status": "active"`},
		{name: "disable unknown", method: "POST", path: "/v1/terminals/T9/disable", status: 404},
		{name: "delete", method: "DELETE", path: "/v1/terminals/T3", status: 204},
		{name: "delete again", method: "DELETE", path: "/v1/terminals/T3", status: 404},
	})
}

func TestChangesEndpoints(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.register(t1)
	e.run([]step{
		{name: "none pending", method: "GET", path: "/v1/terminals/T1/changes", status: 404},
		{name: "bad what", method: "POST", path: "/v1/terminals/T1/changes", body: adminapi.ChangeRequest{What: "everything"}, status: 400, field: "what"},
		{name: "unknown terminal", method: "POST", path: "/v1/terminals/T9/changes", body: adminapi.ChangeRequest{What: "pwd"}, status: 404},
		{name: "start", method: "POST", path: "/v1/terminals/T1/changes", body: adminapi.ChangeRequest{What: "all"}, status: 202, want: `"origin": "operator"`},
		{name: "busy", method: "POST", path: "/v1/terminals/T1/changes", body: adminapi.ChangeRequest{What: "pwd"}, status: 409},
		{name: "status", method: "GET", path: "/v1/terminals/T1/changes", status: 200, want: `"what": "all"`, not: `"up"`},
		{name: "record shows it", method: "GET", path: "/v1/terminals/T1", status: 200, want: `"pending"`},
	})
}

func TestImportStreamsReport(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	csv := "sn,imei,imsi,msisdn,alg\n" +
		"I1,354494040518570,460020084678120,,\n" +
		"I2,354494040518571,460020084678121,8613800000000,md5\n" +
		"I1,354494040518572,460020084678122,,\n" + // duplicate
		"bad!,354494040518573,460020084678123,,\n"
	status, body := e.call(token, "POST", "/v1/terminals/import", csv)
	if status != 200 {
		t.Fatalf("import: %d %s", status, body)
	}
	var rep *adminapi.ImportReport
	progress := 0
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		var ev adminapi.ImportEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		if ev.Progress != nil {
			progress++
		}
		if ev.Report != nil {
			rep = ev.Report
		}
	}
	if progress == 0 || rep == nil {
		t.Fatalf("stream %s: want progress lines and a report", body)
	}
	if rep.Rows != 4 || rep.Created != 2 || len(rep.Rejected) != 2 || rep.Rejected[0].Line != 4 || rep.Rejected[1].Line != 5 {
		t.Fatalf("report %+v", rep)
	}
	e.run([]step{
		{name: "bad header", method: "POST", path: "/v1/terminals/import", body: "serial,imei\nA,1\n", status: 400},
		{name: "imported", method: "GET", path: "/v1/terminals/I2", status: 200, want: `"msisdn": "8613800000000"`},
	})
}

func TestSessionsAndApps(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	b := e.register(t1)

	// A terminal from the client library, with a session key.
	c := connect(t, e.b.Addr("tcp"), b)
	e.run([]step{
		{name: "session listed", method: "GET", path: "/v1/sessions", status: 200, want: `"client_id": "T1"`},
		{name: "with its key", method: "GET", path: "/v1/sessions", status: 200, want: `"session_key": true`},
		{name: "disconnect unknown", method: "DELETE", path: "/v1/sessions/nobody", status: 404},
		{name: "disconnect", method: "DELETE", path: "/v1/sessions/T1", status: 204},
	})
	c.Close()

	status, body := e.call(token, "POST", "/v1/apps", adminapi.AppRequest{Name: "dash"})
	var app adminapi.App
	if json.Unmarshal(body, &app); status != 201 || len(app.Password) != 24 {
		t.Fatalf("add app: %d %s", status, body)
	}
	e.run([]step{
		{name: "listed", method: "GET", path: "/v1/apps", status: 200, want: `"dash"`},
		{name: "get hides password", method: "GET", path: "/v1/apps/dash", status: 200, want: "m2m/+/up/#", not: app.Password},
		{name: "given password not echoed", method: "POST", path: "/v1/apps", body: adminapi.AppRequest{Name: "ops", Password: "a-long-enough-password"}, status: 201, not: "a-long-enough-password"},
		{name: "short password", method: "POST", path: "/v1/apps", body: adminapi.AppRequest{Name: "ops", Password: "short"}, status: 400, field: "password"},
		{name: "bad name", method: "POST", path: "/v1/apps", body: adminapi.AppRequest{Name: ".hidden"}, status: 400, field: "name"},
		{name: "bad filter", method: "POST", path: "/v1/apps", body: adminapi.AppRequest{Name: "x", Subscribe: []string{"a/#/b"}}, status: 400, field: "subscribe/publish", want: "a/#/b", not: "keysvc"},
		{name: "overlapping name", method: "POST", path: "/v1/apps", body: adminapi.AppRequest{Name: "dash-x"}, status: 409, want: `"application dash already exists with an overlapping name`, not: "keysvc"},
		{name: "remove", method: "DELETE", path: "/v1/apps/dash", status: 204},
		{name: "remove again", method: "DELETE", path: "/v1/apps/dash", status: 404},
	})
}

// TestStoreUnavailable: with the store gone every call answers 503, and no
// answer (the unauthenticated /healthz included) carries the store's
// internal error: it goes to the broker's log.
func TestStoreUnavailable(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.b.Service().Store().Close()
	e.run([]step{
		{name: "healthz", method: "GET", path: "/healthz", tok: "-", status: 503, want: "unavailable", not: "closed"}, // no internals
		{name: "get", method: "GET", path: "/v1/terminals/T1", status: 503, want: "store is unavailable", not: "boltstore"},
		{name: "register", method: "POST", path: "/v1/terminals", body: t1, status: 503, not: "boltstore"},
		{name: "apps", method: "GET", path: "/v1/apps", status: 503, not: "boltstore"},
	})
}

// TestInternalErrorsNotEchoed: an error the API does not map (a failed
// random source; a store that fails in the middle of an import) answers
// 500, or ends the import's stream, with a fixed text: the error, which
// may name files, addresses or the layers it went through, goes to the
// log only.
func TestInternalErrorsNotEchoed(t *testing.T) {
	t.Parallel()
	const secret = "keysvc: boltstore: open /var/lib/secret-path: entropy source failed"
	e := newEnv(t)
	broken := serve(t, e.b, admin.Options{Terminals: e.b.Service(), Apps: e.b.Service(), Sessions: e.b.Hook(),
		Rand: func([]byte) error { return errors.New(secret) }})
	broken.run([]step{
		{name: "generated app password", method: "POST", path: "/v1/apps", body: adminapi.AppRequest{Name: "dash"}, status: 500,
			want: "the broker's log has the details", not: "secret-path"},
	})

	// A real store does not fail half-way through an import on demand: a
	// registry that stores the first batch, then fails, does.
	failing := serve(t, e.b, admin.Options{Terminals: failingImport{e.b.Service(), secret}, Apps: e.b.Service(), Sessions: e.b.Hook()})
	rep, err := failing.api.ImportTerminals(t.Context(), strings.NewReader("sn,imei,imsi\nF1,354494040518570,460020084678120\n"), nil)
	if !errors.Is(err, adminapi.ErrImportStopped) || rep == nil || rep.Created != 1 {
		t.Fatalf("import = %+v, %v; want the report of 1 created and ErrImportStopped", rep, err)
	}
	if strings.Contains(err.Error(), "secret-path") || strings.Contains(err.Error(), "keysvc") {
		t.Fatalf("the stream's error shows the internal error: %v", err)
	}
}

// failingImport is a registry whose imports store a batch, report it and
// then fail with an internal error.
type failingImport struct {
	admin.Terminals
	cause string
}

func (f failingImport) Import(ctx context.Context, r io.Reader, opts keysvc.ImportOptions) (keysvc.ImportReport, error) {
	opts.Progress(1, 1)
	return keysvc.ImportReport{Rows: 1, Created: 1}, fmt.Errorf("%s: %w", f.cause, keysvc.ErrUnavailable)
}

// register registers req with the client.
func (e *env) register(req adminapi.RegisterRequest) *adminapi.Bundle {
	e.t.Helper()
	b, err := e.api.Register(e.t.Context(), req)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// connect logs terminal b in with the reference client and a session key.
func connect(t *testing.T, addr string, b *adminapi.Bundle) *client.Client {
	t.Helper()
	rec := bundleRecord(t, b)
	c, err := client.New(client.Config{Brokers: []string{"tcp://" + addr}, Identity: rec.Identity, Alg: rec.Alg,
		Store: client.NewMemStore(rec), SessionKey: true, CleanSession: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if !c.Session().Encrypted {
		t.Fatal("no session key")
	}
	return c
}

func bundleRecord(t *testing.T, b *adminapi.Bundle) *client.Record {
	alg, _ := codec.ParseAlg(b.Alg)
	bk := make([]byte, 32)
	if _, err := hexDecode(bk, b.BK); err != nil {
		t.Fatal(err)
	}
	return &client.Record{Identity: codec.Identity{SN: b.SN, IMEI: b.IMEI, IMSI: b.IMSI}, Alg: alg,
		Current: client.Credentials{Up: []byte(b.Up), UpExp: b.UpExp, Down: []byte(b.Down), DownExp: b.DownExp, BK: bk, BKExp: b.BKExp}}
}

func hexDecode(dst []byte, s string) (int, error) { return hex.Decode(dst, []byte(s)) }

// TestCampaignsEndpoints: /v1/campaigns checks its input, maps the
// runner's refusals (rate above campaigns.max_rate, a second running
// campaign) and reports progress and the terminals by outcome; a
// read-only operator may follow a campaign, not start or cancel one.
func TestCampaignsEndpoints(t *testing.T) {
	e := newEnv(t)
	e = serve(t, e.b, admin.Options{Terminals: e.b.Service(), Apps: e.b.Service(), Sessions: e.b.Hook(), Campaigns: e.b.Campaigns(),
		Operators: operators(t)})
	e.register(t1)
	e.register(adminapi.RegisterRequest{SN: "T2", IMEI: "354494040518570", IMSI: "460020084678120"})
	list := adminapi.CampaignRequest{Select: "list", SNs: []string{"T2"}, What: "pwd", Rate: 50}
	e.run([]step{
		{name: "no token", method: "POST", path: "/v1/campaigns", body: list, tok: "-", status: 401},
		{name: "bad what", method: "POST", path: "/v1/campaigns", body: adminapi.CampaignRequest{Select: "all", What: "everything"}, status: 400, field: "what"},
		{name: "bad select", method: "POST", path: "/v1/campaigns", body: adminapi.CampaignRequest{Select: "some", What: "pwd"}, status: 400, field: "select"},
		{name: "list without sns", method: "POST", path: "/v1/campaigns", body: adminapi.CampaignRequest{Select: "list", What: "pwd"}, status: 400, field: "sns"},
		{name: "status without status", method: "POST", path: "/v1/campaigns", body: adminapi.CampaignRequest{Select: "status", What: "pwd"}, status: 400, field: "status"},
		{name: "bad date", method: "POST", path: "/v1/campaigns", body: adminapi.CampaignRequest{Select: "expiring", Before: "soon", What: "pwd"}, status: 400, field: "before"},
		{name: "rate above max", method: "POST", path: "/v1/campaigns", body: adminapi.CampaignRequest{Select: "all", What: "pwd", Rate: 1e5}, status: 400, field: "rate", want: "campaigns.max_rate"},
		{name: "bad id", method: "GET", path: "/v1/campaigns/xyz", status: 400, field: "id"},
		{name: "unknown id", method: "GET", path: "/v1/campaigns/0123456789abcdef", status: 404},
		{name: "bad outcome", method: "GET", path: "/v1/campaigns/0123456789abcdef/terminals?outcome=lost", status: 400, field: "outcome"},
	})
	ctx := context.Background()
	c, err := e.api.StartCampaign(ctx, list)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); c.State != "done" && c.State != "tracking"; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("campaign %+v", c)
		}
		if c, err = e.api.Campaign(ctx, c.ID); err != nil {
			t.Fatal(err)
		}
	}
	if c.Handled != 1 || c.Counts.Waiting != 1 || c.ListSize != 1 {
		t.Fatalf("campaign %+v", c)
	}
	e.run([]step{
		{name: "terminals", method: "GET", path: "/v1/campaigns/" + c.ID + "/terminals?outcome=waiting", status: 200, want: `"sn": "T2"`, not: `"sn": "T1"`}, // not a bare T1: the times hold "T1" from 10:00 to 19:59 UTC
		{name: "the change", method: "GET", path: "/v1/terminals/T2/changes", status: 200, want: `"origin": "operator"`},
		{name: "list", method: "GET", path: "/v1/campaigns", status: 200, want: c.ID},
		{name: "viewer reads", method: "GET", path: "/v1/campaigns/" + c.ID, tok: viewerToken, status: 200, want: c.ID},
		{name: "viewer's terminals", method: "GET", path: "/v1/campaigns/" + c.ID + "/terminals", tok: viewerToken, status: 200, want: `"sn": "T2"`},
		{name: "viewer may not cancel", method: "POST", path: "/v1/campaigns/" + c.ID + "/cancel", tok: viewerToken, status: 403},
		{name: "viewer may not start", method: "POST", path: "/v1/campaigns", body: adminapi.CampaignRequest{Select: "all", What: "bk"}, tok: viewerToken, status: 403},
		{name: "cancel", method: "POST", path: "/v1/campaigns/" + c.ID + "/cancel", tok: aliceToken, status: 200, want: `"state": "cancelled"`},
		{name: "second campaign", method: "POST", path: "/v1/campaigns", body: adminapi.CampaignRequest{Select: "all", What: "bk", Rate: 1}, status: 201},
		{name: "third while one runs", method: "POST", path: "/v1/campaigns", body: adminapi.CampaignRequest{Select: "all", What: "bk", Rate: 1}, status: 409},
	})
}

// Package admin is the m2mguard broker's admin HTTP API: terminals,
// credential changes, sessions and applications, as JSON over HTTP with a
// bearer token, plus /metrics and /healthz.
//
//	GET    /healthz                          store reachability (no token; says ok or unavailable, nothing more)
//	GET    /metrics                          Prometheus (the metrics token or the admin token)
//	POST   /v1/terminals                     register; answers the provisioning Bundle (secrets, once)
//	GET    /v1/terminals?after=&limit=       list, paged
//	GET    /v1/terminals/{sn}                one record, without secrets
//	DELETE /v1/terminals/{sn}                delete
//	POST   /v1/terminals/{sn}/disable        disable (its logins are refused)
//	POST   /v1/terminals/{sn}/enable         enable
//	POST   /v1/terminals/{sn}/rekey          new credentials out of band; answers the Bundle (secrets, once)
//	POST   /v1/terminals/import              CSV body; NDJSON stream of progress, then the report
//	POST   /v1/terminals/{sn}/changes        start a credential change {"what":"pwd|bk|all"}
//	GET    /v1/terminals/{sn}/changes        the pending change (metadata only)
//	GET    /v1/sessions                      connected clients (in fleet mode: of every broker)
//	DELETE /v1/sessions/{client_id}          disconnect one (in fleet mode: on the broker holding it)
//	GET    /v1/apps                          application names
//	POST   /v1/apps                          add or replace an application
//	GET    /v1/apps/{name}                   one application (no password)
//	DELETE /v1/apps/{name}                   remove
//	POST   /v1/campaigns                     start a fleet-wide credential change
//	GET    /v1/campaigns                     every campaign and its progress
//	GET    /v1/campaigns/{id}                one campaign: state, cursor, counts by outcome
//	POST   /v1/campaigns/{id}/cancel         no more changes start; those started go on
//	GET    /v1/campaigns/{id}/terminals?outcome=&after=&limit=   its terminals by outcome, paged
//	GET    /v1/reports/{kind}?before=&since= expiring, never-seen, not-seen: NDJSON stream of rows
//	GET    /v1/whoami                        the name and role of the token
//
// Tokens: Options.Token is the operator "admin" (role full); Options.Operators
// are named tokens, each full or read. A read-only operator may GET; any
// other request of it is 403. The name of the operator goes into the audit
// line of every change and into the hook's events of what it started.
//
// Errors are JSON {"error": "...", "field": "..."}: 400 bad input, 401 no
// or wrong token, 403 a read-only operator's change, 404 not found, 409
// exists or busy, 503 store unavailable (or, in fleet mode, the broker
// holding the session did not answer). The JSON types are package
// adminapi's, which also has the typed client.
//
// Every request is counted in m2mguard_admin_requests_total{route,status}
// and timed in m2mguard_admin_request_duration_seconds{route}, where route
// is the pattern the request matched ("GET /v1/terminals/{sn}"; "/" for an
// unknown endpoint), never its path: see Options.Registerer.
package admin

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/lastseen"
)

// Terminals is the terminal registry the handlers use. The broker passes
// its *keysvc.Service.
type Terminals interface {
	Register(ctx context.Context, r keysvc.RegisterRequest) (*keysvc.Terminal, error)
	Get(ctx context.Context, sn string) (*keysvc.Terminal, error)
	List(ctx context.Context, after string, limit int) ([]*keysvc.Terminal, string, error)
	SetStatus(ctx context.Context, sn string, st keysvc.Status) (*keysvc.Terminal, error)
	Disable(ctx context.Context, sn string) (*keysvc.Terminal, *keysvc.Change, error)
	Rekey(ctx context.Context, sn string) (*keysvc.Terminal, error)
	Delete(ctx context.Context, sn string) error
	Import(ctx context.Context, r io.Reader, opts keysvc.ImportOptions) (keysvc.ImportReport, error)
}

// Apps is the application registry the handlers use. The broker passes
// its *keysvc.Service. /healthz probes the store with ListApps, so it
// must not answer from a cache.
type Apps interface {
	ListApps(ctx context.Context) ([]string, error)
	GetApp(ctx context.Context, name string) (*keysvc.App, error)
	AddApp(ctx context.Context, r keysvc.AddAppRequest) (*keysvc.App, error)
	RemoveApp(ctx context.Context, name string) error
}

// Sessions is what the handlers reach on the broker's live connections:
// the session list, a disconnect, the end of a terminal's sessions after
// it was disabled, deleted or rekeyed, and credential changes (delivered
// at once to an online terminal). The broker passes its *hook.Hook, or in
// fleet mode the fleet's (package fleetlink), whose calls reach the
// broker that holds the session; an error wrapping ErrBrokerUnreachable
// names a broker that did not answer. Each action names the operator who
// asked for it, for the hook's events.
type Sessions interface {
	Sessions() []hook.SessionInfo
	DisconnectBy(clientID, operator string) error
	RevokeBy(sn, reason, operator string) int
	StartChangeBy(ctx context.Context, sn string, what codec.What, operator string) (*keysvc.Change, error)
}

// LastSeen is where the terminals' last logins are kept (package
// lastseen). The broker passes its *lastseen.Table.
type LastSeen interface {
	Get(sn string) (lastseen.Entry, bool)
	Forget(sn string)
}

// FleetSessions is implemented by the Sessions of a fleet: the session
// list of every broker, with warnings that name the brokers that did not
// answer (their sessions are missing) or say that the fleet is
// unreachable (the list is this broker's alone). GET /v1/sessions uses it
// when Options.Sessions has it.
type FleetSessions interface {
	FleetSessions(ctx context.Context) (sessions []hook.SessionInfo, warnings []string)
}

// ErrBrokerUnreachable is wrapped by the errors of Sessions calls that
// another broker of the fleet did not answer (it holds the session and is
// gone, or slow); the error's text names it. The API answers 503.
var ErrBrokerUnreachable = errors.New("a broker of the fleet did not answer")

// Options configure the API.
type Options struct {
	Terminals    Terminals             // required
	Apps         Apps                  // required
	Sessions     Sessions              // required
	Token        string                // bearer token of the operator "admin" (full); required, at least 16 characters
	Operators    []Operator            // named tokens (ParseOperators); their hashes and names unique, none "admin"
	MetricsToken string                // bearer token for /metrics only (every operator's works there too); "" = none
	LastSeen     LastSeen              // last logins, shown with terminals and in reports; nil = none
	Campaigns    Campaigns             // nil = no /v1/campaigns endpoints
	Gatherer     prometheus.Gatherer   // served on /metrics; nil = no /metrics
	Registerer   prometheus.Registerer // gets the API's request metrics (the broker: its registry); nil = none
	BrokerURL    string                // written into provisioning bundles
	Logger       *slog.Logger          // nil = slog.Default()
	MaxImport    int64                 // largest CSV body, bytes; 0 = 1 GiB
	Timeout      time.Duration         // per store call outside imports; 0 = 30 s
	Now          func() time.Time      // nil = time.Now
	Rand         func(b []byte) error  // nil = crypto/rand
}

type api struct {
	opts         Options
	ops          operators // the admin token's operator first
	metricsToken [32]byte  // SHA-256 of Options.MetricsToken
	hasMetrics   int       // 1 if there is a metrics token
	log          *slog.Logger
}

// New returns the API's handler.
func New(opts Options) (http.Handler, error) {
	if opts.Terminals == nil || opts.Apps == nil || opts.Sessions == nil {
		return nil, errors.New("admin: Terminals, Apps and Sessions are required")
	}
	if len(opts.Token) < 16 {
		return nil, errors.New("admin: the token must have at least 16 characters")
	}
	if opts.MetricsToken != "" && len(opts.MetricsToken) < 16 {
		return nil, errors.New("admin: the metrics token must have at least 16 characters")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxImport <= 0 {
		opts.MaxImport = 1 << 30
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 30 * time.Second
	}
	if opts.Rand == nil {
		opts.Rand = func(b []byte) error { _, err := rand.Read(b); return err }
	}
	a := &api{opts: opts, log: opts.Logger,
		ops: operators{{Name: AdminOperator, Role: adminapi.RoleFull, Hash: sha256.Sum256([]byte(opts.Token))}}}
	if opts.MetricsToken != "" {
		a.metricsToken, a.hasMetrics = sha256.Sum256([]byte(opts.MetricsToken)), 1
	}
	for _, op := range opts.Operators {
		if err := validOperatorName(op.Name); err != nil {
			return nil, fmt.Errorf("admin: operator %q: %w", op.Name, err)
		}
		if op.Role != adminapi.RoleFull && op.Role != adminapi.RoleRead {
			return nil, fmt.Errorf("admin: operator %s: role: want full or read", op.Name)
		}
		for _, other := range a.ops {
			switch {
			case op.Name == other.Name:
				return nil, fmt.Errorf("admin: operator %s twice (%q is the admin token's)", op.Name, AdminOperator)
			case op.Hash == other.Hash:
				return nil, fmt.Errorf("admin: operator %s has the token of %s", op.Name, other.Name)
			}
		}
		if a.hasMetrics == 1 && op.Hash == a.metricsToken {
			return nil, fmt.Errorf("admin: operator %s has the metrics token", op.Name)
		}
		a.ops = append(a.ops, op)
	}
	mux := http.NewServeMux()
	routes := map[string]bool{} // the patterns, the only values of the route label
	handle := func(pattern string, h http.Handler) {
		mux.Handle(pattern, h)
		routes[pattern] = true
	}
	handle("GET /healthz", http.HandlerFunc(a.healthz))
	if opts.Gatherer != nil {
		// The refusal reasons and binding events in the metrics tell which
		// identities exist: not for anyone who can reach the port.
		metrics := promhttp.HandlerFor(opts.Gatherer, promhttp.HandlerOpts{})
		handle("GET /metrics", a.requireMetrics(metrics.ServeHTTP))
	}
	// read: any operator; change: full operators only (403 for read-only).
	read := func(pattern string, h http.HandlerFunc) { handle(pattern, a.require(false, h)) }
	change := func(pattern string, h http.HandlerFunc) { handle(pattern, a.require(true, h)) }
	change("POST /v1/terminals", a.register)
	read("GET /v1/terminals", a.list)
	change("POST /v1/terminals/import", a.importCSV)
	read("GET /v1/terminals/{sn}", a.get)
	change("DELETE /v1/terminals/{sn}", a.delete)
	change("POST /v1/terminals/{sn}/disable", a.setStatus(keysvc.StatusDisabled))
	change("POST /v1/terminals/{sn}/enable", a.setStatus(keysvc.StatusActive))
	change("POST /v1/terminals/{sn}/rekey", a.rekey)
	change("POST /v1/terminals/{sn}/changes", a.startChange)
	read("GET /v1/terminals/{sn}/changes", a.changeStatus)
	read("GET /v1/sessions", a.sessions)
	change("DELETE /v1/sessions/{id}", a.disconnect)
	read("GET /v1/apps", a.listApps)
	change("POST /v1/apps", a.addApp)
	read("GET /v1/apps/{name}", a.getApp)
	change("DELETE /v1/apps/{name}", a.removeApp)
	read("GET /v1/reports/{kind}", a.report)
	read("GET /v1/whoami", a.whoami)
	if opts.Campaigns != nil {
		change("POST /v1/campaigns", a.startCampaign)
		read("GET /v1/campaigns", a.listCampaigns)
		read("GET /v1/campaigns/{id}", a.getCampaign)
		change("POST /v1/campaigns/{id}/cancel", a.cancelCampaign)
		read("GET /v1/campaigns/{id}/terminals", a.campaignTerminals)
	}
	// Any other method or path: 403 for a read-only operator if it is
	// not a GET, else 404.
	handle("/", a.require(false, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead && operatorOf(r.Context()).Role != adminapi.RoleFull {
			a.forbid(w, r, operatorOf(r.Context()))
			return
		}
		writeJSON(w, http.StatusNotFound, adminapi.Error{Message: "no such endpoint: " + r.Method + " " + r.URL.Path})
	}))
	if opts.Registerer == nil {
		return mux, nil
	}
	m, err := newRequestMetrics(opts.Registerer)
	if err != nil {
		return nil, err
	}
	return m.instrument(routes, mux), nil
}

// bearer returns the SHA-256 of the request's bearer token, and whether
// it has one.
func bearer(r *http.Request) ([32]byte, bool) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return sha256.Sum256([]byte(strings.TrimSpace(tok))), ok
}

// require serves next to requests whose bearer token is an operator's
// (401 for the others), with the operator in the request's context; a
// request that changes something (change) needs a full operator (403 for
// a read-only one).
func (a *api) require(change bool, next http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sum, ok := bearer(r)
		op, known := a.ops.who(sum)
		if !ok || !known {
			a.unauthorized(w, r)
			return
		}
		if change && op.Role != adminapi.RoleFull {
			a.forbid(w, r, op)
			return
		}
		next(w, r.WithContext(withOperator(r.Context(), op)))
	})
}

// requireMetrics serves /metrics to the metrics token and to every
// operator; both are compared, in constant time.
func (a *api) requireMetrics(next http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sum, ok := bearer(r)
		_, known := a.ops.who(sum)
		metrics := subtle.ConstantTimeCompare(sum[:], a.metricsToken[:]) & a.hasMetrics
		if !ok || !(known || metrics == 1) {
			a.unauthorized(w, r)
			return
		}
		next(w, r)
	})
}

func (a *api) unauthorized(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="m2mguard"`)
	writeJSON(w, http.StatusUnauthorized, adminapi.Error{Message: "missing or wrong bearer token"})
	a.log.Warn("admin request refused", "reason", "bad-token", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr)
}

func (a *api) forbid(w http.ResponseWriter, r *http.Request, op Operator) {
	writeJSON(w, http.StatusForbidden, adminapi.Error{Message: "operator " + op.Name + " may only read (role " + op.Role + ")"})
	a.log.Warn("admin request refused", "reason", "read-only", "operator", op.Name, "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr)
}

// audit logs a change an operator made: the line names the operator and
// where the request came from.
func (a *api) audit(r *http.Request, msg string, attrs ...any) {
	a.log.Info(msg, append(attrs, "operator", operatorOf(r.Context()).Name, "remote", r.RemoteAddr)...)
}

func (a *api) whoami(w http.ResponseWriter, r *http.Request) {
	op := operatorOf(r.Context())
	writeJSON(w, http.StatusOK, adminapi.Operator{Name: op.Name, Role: op.Role})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// fieldError is bad input in a named field.
type fieldError struct {
	field string
	msg   string
}

func (e *fieldError) Error() string { return e.field + ": " + e.msg }

func badField(field, format string, a ...any) error {
	return &fieldError{field: field, msg: fmt.Sprintf(format, a...)}
}

// fail answers err with the status its sentinel maps to and a short
// message for an operator: what failed and why, never the layers it went
// through (keysvc, the store). Answers of 500 and 503 carry no internal
// detail at all; the error is logged instead.
func (a *api) fail(w http.ResponseWriter, r *http.Request, err error) {
	var fe *fieldError
	var ce *codec.Error
	var mbe *http.MaxBytesError
	subject := subjectOf(r)
	status, body := http.StatusInternalServerError, adminapi.Error{Message: "internal error (the broker's log has the details)"}
	switch {
	case errors.As(err, &fe):
		status, body = http.StatusBadRequest, adminapi.Error{Message: fe.Error(), Field: fe.field}
	case errors.As(err, &mbe):
		status, body.Message = http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", mbe.Limit)
	case errors.As(err, &ce):
		status, body = http.StatusBadRequest, adminapi.Error{Message: ce.Field + ": " + ce.Reason, Field: ce.Field}
		if ce.Field == "" {
			body.Message = ce.Reason
		}
	case errors.Is(err, keysvc.ErrInvalid):
		status, body.Message = http.StatusBadRequest, reason(err, keysvc.ErrInvalid)
	case errors.Is(err, keysvc.ErrNotFound):
		status, body.Message = http.StatusNotFound, subject+" not found"
	case errors.Is(err, hook.ErrNoSession):
		status, body.Message = http.StatusNotFound, "no connected client "+r.PathValue("id")
	case errors.Is(err, ErrBrokerUnreachable):
		status, body.Message = http.StatusServiceUnavailable, err.Error()
	case errors.Is(err, keysvc.ErrExists):
		status, body.Message = http.StatusConflict, subject+" already exists"
		if msg := err.Error(); !strings.HasSuffix(msg, keysvc.ErrExists.Error()) {
			body.Message = withoutLayer(msg) // it says more: which other name overlaps
		}
	case errors.Is(err, keysvc.ErrBusy):
		status, body.Message = http.StatusConflict, "a change is already pending for "+subject
	case errors.Is(err, keysvc.ErrInactive):
		status, body.Message = http.StatusConflict, subject+" is disabled"
	case errors.Is(err, keysvc.ErrConflict):
		status, body.Message = http.StatusConflict, subject+" was changed by another request at the same time; try again"
	case errors.Is(err, keysvc.ErrUnavailable), errors.Is(err, context.DeadlineExceeded):
		status, body.Message = http.StatusServiceUnavailable, "the broker's store is unavailable (the broker's log has the details)"
	case errors.Is(err, keysvc.ErrForbidden):
		status, body.Message = http.StatusServiceUnavailable, "the broker's store refused the request (the broker's log has the details)"
	}
	if status >= 500 {
		a.log.Error("admin request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err.Error())
	}
	writeJSON(w, status, body)
}

// subjectOf names what a request is about, for error messages: "terminal
// A1", "application dash", or the kind alone.
func subjectOf(r *http.Request) string {
	switch {
	case r.PathValue("sn") != "":
		return "terminal " + r.PathValue("sn")
	case r.PathValue("name") != "":
		return "application " + r.PathValue("name")
	case strings.HasPrefix(r.URL.Path, "/v1/apps"):
		return "application"
	case r.PathValue("id") != "" && strings.HasPrefix(r.URL.Path, "/v1/campaigns"):
		return "campaign " + r.PathValue("id")
	case strings.HasPrefix(r.URL.Path, "/v1/campaigns"):
		return "campaign"
	default:
		return "terminal"
	}
}

// withoutLayer drops the "keysvc: <operation>: " an error of the key
// service starts with: "keysvc: add app a-b: application a already exists
// with an overlapping name: ..." gives "application a already exists ...".
func withoutLayer(msg string) string {
	if rest, ok := strings.CutPrefix(msg, "keysvc: "); ok {
		if _, after, ok := strings.Cut(rest, ": "); ok {
			return after
		}
	}
	return msg
}

// reason is the text of err after its sentinel: "keysvc: add app x:
// invalid: password must be 12 to 128 bytes" gives "password must be 12 to
// 128 bytes".
func reason(err, sentinel error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, sentinel.Error()+": "); i >= 0 {
		return msg[i+len(sentinel.Error())+2:]
	}
	return sentinel.Error()
}

// decode reads a JSON body of at most 64 KiB into v, refusing unknown
// fields.
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	return decodeLimited(w, r, v, 64<<10)
}

// decodeLimited is decode for a body of at most limit bytes.
func decodeLimited(w http.ResponseWriter, r *http.Request, v any, limit int64) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return badField(strings.Trim(f, `"`), "unknown field")
		}
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return badField(te.Field, "want a %s", te.Type)
		}
		return badField("body", "want a JSON object: %v", err)
	}
	if dec.More() {
		return badField("body", "trailing data after the JSON object")
	}
	return nil
}

func (a *api) ctx(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), a.opts.Timeout)
}

func pathSN(r *http.Request) (string, error) {
	sn := r.PathValue("sn")
	if err := codec.ValidateSN(sn); err != nil {
		return "", badField("sn", "want 1 to 16 of [A-Za-z0-9]")
	}
	return sn, nil
}

// healthz reports whether the store answers: listing the applications (a
// small read every store policy allows) must succeed.
func (a *api) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	_, err := a.opts.Apps.ListApps(ctx)
	if err == nil || errors.Is(err, keysvc.ErrNotFound) {
		writeJSON(w, http.StatusOK, adminapi.Health{Status: "ok", Store: "ok"})
		return
	}
	// The error (store address, paths) goes to the log, not to whoever asks.
	a.log.Warn("health check: store unavailable", "err", err.Error())
	writeJSON(w, http.StatusServiceUnavailable, adminapi.Health{Status: "unavailable", Store: "unavailable", Error: "the store does not answer"})
}

func (a *api) register(w http.ResponseWriter, r *http.Request) {
	var req adminapi.RegisterRequest
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	rr := keysvc.RegisterRequest{SN: req.SN, IMEI: req.IMEI, IMSI: req.IMSI, MSISDN: req.MSISDN, RequireEncryption: req.RequireEncryption}
	if err := (codec.Identity{SN: req.SN, IMEI: req.IMEI, IMSI: req.IMSI}).Validate(); err != nil {
		a.fail(w, r, err)
		return
	}
	if req.Alg != "" {
		alg, err := codec.ParseAlg(req.Alg)
		if err != nil {
			a.fail(w, r, badField("alg", "want md5 or hs256"))
			return
		}
		rr.Alg = alg
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	t, err := a.opts.Terminals.Register(ctx, rr)
	if err != nil {
		if errors.Is(err, keysvc.ErrExists) {
			writeJSON(w, http.StatusConflict, adminapi.Error{Message: "terminal " + req.SN + " already exists", Field: "sn"})
			return
		}
		a.fail(w, r, err)
		return
	}
	a.audit(r, "terminal registered", "sn", t.SN, "alg", t.Alg.String())
	w.Header().Set("Location", "/v1/terminals/"+t.SN)
	writeJSON(w, http.StatusCreated, bundleOf(t, a.opts.BrokerURL))
}

func (a *api) get(w http.ResponseWriter, r *http.Request) {
	sn, err := pathSN(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	t, err := a.opts.Terminals.Get(ctx, sn)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, a.terminalView(t))
}

// pageParams reads the paging of a listing by serial number: after (a
// serial number, or "" for the start) and limit (1 to 1000, default 100).
func pageParams(q url.Values) (after string, limit int, err error) {
	after = q.Get("after")
	if after != "" && codec.ValidateSN(after) != nil {
		return "", 0, badField("after", "want a serial number (1 to 16 of [A-Za-z0-9])")
	}
	limit = 100
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 1000 {
			return "", 0, badField("limit", "want 1 to 1000")
		}
		limit = n
	}
	return after, limit, nil
}

func (a *api) list(w http.ResponseWriter, r *http.Request) {
	after, limit, err := pageParams(r.URL.Query())
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	ts, next, err := a.opts.Terminals.List(ctx, after, limit)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	out := adminapi.TerminalList{Terminals: make([]adminapi.Terminal, 0, len(ts)), Next: next}
	for _, t := range ts {
		out.Terminals = append(out.Terminals, a.terminalView(t))
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *api) delete(w http.ResponseWriter, r *http.Request) {
	sn, err := pathSN(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	if err := a.opts.Terminals.Delete(ctx, sn); err != nil {
		a.fail(w, r, err)
		return
	}
	ended := a.opts.Sessions.RevokeBy(sn, hook.RevokeDeleted, operatorOf(r.Context()).Name)
	if a.opts.LastSeen != nil {
		a.opts.LastSeen.Forget(sn) // a terminal registered again under sn has never been seen
	}
	a.audit(r, "terminal deleted", "sn", sn, "sessions_ended", ended)
	w.WriteHeader(http.StatusNoContent)
}

// setStatus enables or disables a terminal. Disabling cancels its pending
// change (in the same store write) and ends its live sessions at once.
func (a *api) setStatus(st keysvc.Status) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		sn, err := pathSN(r)
		if err != nil {
			a.fail(w, r, err)
			return
		}
		ctx, cancel := a.ctx(r)
		defer cancel()
		if st == keysvc.StatusActive {
			t, err := a.opts.Terminals.SetStatus(ctx, sn, st)
			if err != nil {
				a.fail(w, r, err)
				return
			}
			a.audit(r, "terminal enabled", "sn", sn)
			writeJSON(w, http.StatusOK, a.terminalView(t))
			return
		}
		t, cancelled, err := a.opts.Terminals.Disable(ctx, sn)
		if err != nil {
			a.fail(w, r, err)
			return
		}
		ended := a.opts.Sessions.RevokeBy(sn, hook.RevokeDisabled, operatorOf(r.Context()).Name)
		attrs := []any{"sn", sn, "sessions_ended", ended}
		if cancelled != nil {
			attrs = append(attrs, "cancelled_change", cancelled.RID.String())
		}
		a.audit(r, "terminal disabled", attrs...)
		writeJSON(w, http.StatusOK, a.terminalView(t))
	}
}

// rekey replaces every credential of a terminal out of band and answers
// the new provisioning bundle, once. Its live sessions end (they hold the
// old values).
func (a *api) rekey(w http.ResponseWriter, r *http.Request) {
	sn, err := pathSN(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	t, err := a.opts.Terminals.Rekey(ctx, sn)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ended := a.opts.Sessions.RevokeBy(sn, hook.RevokeRekeyed, operatorOf(r.Context()).Name)
	a.audit(r, "terminal rekeyed", "sn", sn, "sessions_ended", ended, "status", string(t.Status))
	writeJSON(w, http.StatusOK, bundleOf(t, a.opts.BrokerURL))
}

// importCSV streams NDJSON: a progress line after every batch, then the
// report. With ?creds=true, the provisioning bundle of every terminal
// stored goes out first, each on its line (the one time its secrets are
// shown; they are never logged). Errors found before anything was streamed
// (a bad header) get their own status code; later ones end the stream with
// an error line.
func (a *api) importCSV(w http.ResponseWriter, r *http.Request) {
	withCreds := false
	switch v := r.URL.Query().Get("creds"); v {
	case "", "false":
	case "true":
		withCreds = true
	default:
		a.fail(w, r, badField("creds", "want true or false"))
		return
	}
	body := http.MaxBytesReader(w, r.Body, a.opts.MaxImport)
	started := false
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	start := func() {
		if !started {
			started = true
			w.Header().Set("Content-Type", "application/x-ndjson")
			w.Header().Set("Cache-Control", "no-store")
			w.WriteHeader(http.StatusOK)
		}
	}
	opts := keysvc.ImportOptions{Progress: func(done, total int) {
		start()
		enc.Encode(adminapi.ImportEvent{Progress: &adminapi.Progress{Done: done, Total: total}})
		rc.Flush()
	}}
	handedOn := 0
	if withCreds {
		opts.Created = func(t *keysvc.Terminal) error {
			start()
			b := bundleOf(t, a.opts.BrokerURL)
			if err := enc.Encode(adminapi.ImportEvent{Bundle: &b}); err != nil {
				return fmt.Errorf("sending the credentials: %w", err)
			}
			handedOn++
			return nil
		}
	}
	rep, err := a.opts.Terminals.Import(r.Context(), body, opts)
	out := &adminapi.ImportReport{Rows: rep.Rows, Created: rep.Created, Rejected: make([]adminapi.RowResult, 0, len(rep.Rejected))}
	for _, rr := range rep.Rejected {
		out.Rejected = append(out.Rejected, adminapi.RowResult{Line: rr.Line, SN: rr.SN, Reason: rr.Reason})
	}
	attrs := []any{"rows", rep.Rows, "created", rep.Created, "rejected", len(rep.Rejected)}
	if withCreds {
		attrs = append(attrs, "credentials_returned", handedOn)
	}
	a.audit(r, "terminals imported", attrs...)
	if withCreds && handedOn < rep.Created {
		// Stored, but nobody holds their secrets: the operator must rekey them.
		a.log.Error("import: terminals stored whose credentials did not reach the client; rekey or delete them",
			"stored", rep.Created, "credentials_returned", handedOn, "operator", operatorOf(r.Context()).Name)
	}
	if err != nil && !started {
		a.fail(w, r, err)
		return
	}
	start()
	ev := adminapi.ImportEvent{Report: out}
	if err != nil {
		ev.Error = "the import stopped: the broker's store failed (the broker's log has the details)"
		if errors.Is(err, keysvc.ErrInvalid) {
			ev.Error = "the import stopped: " + reason(err, keysvc.ErrInvalid)
		}
		a.log.Error("import failed", "rows", rep.Rows, "created", rep.Created, "err", err.Error(), "operator", operatorOf(r.Context()).Name, "remote", r.RemoteAddr)
	}
	enc.Encode(ev)
}

func (a *api) startChange(w http.ResponseWriter, r *http.Request) {
	sn, err := pathSN(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	var req adminapi.ChangeRequest
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	what := codec.What(req.What)
	switch what {
	case codec.WhatPwd, codec.WhatBK, codec.WhatAll:
	default:
		a.fail(w, r, badField("what", "want pwd, bk or all"))
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	// The hook picks the mode and delivers at once when the terminal is
	// online, else after its next login.
	ch, err := a.opts.Sessions.StartChangeBy(ctx, sn, what, operatorOf(r.Context()).Name)
	if err != nil {
		if errors.Is(err, keysvc.ErrBusy) {
			writeJSON(w, http.StatusConflict, adminapi.Error{Message: "a change is already pending for " + sn})
			return
		}
		if errors.Is(err, keysvc.ErrInactive) {
			writeJSON(w, http.StatusConflict, adminapi.Error{Message: "terminal " + sn + " is disabled: no credential change starts for it (rekey it out of band)"})
			return
		}
		a.fail(w, r, err)
		return
	}
	a.audit(r, "credential change started", "sn", sn, "what", string(what), "rid", ch.RID.String())
	w.Header().Set("Location", "/v1/terminals/"+sn+"/changes")
	writeJSON(w, http.StatusAccepted, changeView(ch))
}

func (a *api) changeStatus(w http.ResponseWriter, r *http.Request) {
	sn, err := pathSN(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	t, err := a.opts.Terminals.Get(ctx, sn)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if t.Pending == nil || t.Pending.Expired(a.now()) {
		body := adminapi.Error{Message: "no change pending for " + sn}
		if t.LastCommitted != 0 {
			body.Message += " (last committed rid " + t.LastCommitted.String() + ")"
		}
		writeJSON(w, http.StatusNotFound, body)
		return
	}
	writeJSON(w, http.StatusOK, changeView(t.Pending))
}

func (a *api) now() time.Time {
	if a.opts.Now != nil {
		return a.opts.Now()
	}
	return time.Now()
}

func (a *api) sessions(w http.ResponseWriter, r *http.Request) {
	var infos []hook.SessionInfo
	var warnings []string
	if fs, ok := a.opts.Sessions.(FleetSessions); ok {
		ctx, cancel := a.ctx(r)
		defer cancel()
		infos, warnings = fs.FleetSessions(ctx)
		for _, w := range warnings {
			a.log.Warn("session list incomplete", "warning", w)
		}
	} else {
		infos = a.opts.Sessions.Sessions()
	}
	out := adminapi.SessionList{Sessions: make([]adminapi.Session, 0, len(infos)), Warnings: warnings}
	for _, s := range infos {
		// A conversion, not a copy field by field: a field added to one
		// type and not to the other does not compile.
		out.Sessions = append(out.Sessions, adminapi.Session(s))
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *api) disconnect(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if id == "" || len(id) > 65535 {
		a.fail(w, r, badField("client_id", "want a client id"))
		return
	}
	if err := a.opts.Sessions.DisconnectBy(id, operatorOf(r.Context()).Name); err != nil {
		a.fail(w, r, err)
		return
	}
	a.audit(r, "session disconnected", "client_id", id)
	w.WriteHeader(http.StatusNoContent)
}

func (a *api) listApps(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := a.ctx(r)
	defer cancel()
	names, err := a.opts.Apps.ListApps(ctx)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if names == nil {
		names = []string{}
	}
	writeJSON(w, http.StatusOK, adminapi.AppList{Apps: names})
}

const appPasswordAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

func (a *api) addApp(w http.ResponseWriter, r *http.Request) {
	var req adminapi.AppRequest
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	if err := keysvc.ValidateAppName(req.Name); err != nil {
		a.fail(w, r, badField("name", "want 1 to 64 of [A-Za-z0-9._-], not starting with '.'"))
		return
	}
	generated := req.Password == ""
	if generated {
		pw, err := a.password(24)
		if err != nil {
			a.fail(w, r, err)
			return
		}
		req.Password = pw
	} else if n := len(req.Password); n < 12 || n > 128 {
		a.fail(w, r, badField("password", "want 12 to 128 bytes"))
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	app, err := a.opts.Apps.AddApp(ctx, keysvc.AddAppRequest{Name: req.Name, Password: []byte(req.Password), Subscribe: req.Subscribe, Publish: req.Publish})
	if err != nil {
		if errors.Is(err, keysvc.ErrInvalid) && strings.Contains(err.Error(), "topic filter") {
			writeJSON(w, http.StatusBadRequest, adminapi.Error{Message: reason(err, keysvc.ErrInvalid), Field: "subscribe/publish"})
			return
		}
		a.fail(w, r, err)
		return
	}
	a.audit(r, "application added", "app", app.Name)
	out := appView(app)
	if generated {
		out.Password = req.Password
	}
	writeJSON(w, http.StatusCreated, out)
}

func (a *api) getApp(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := keysvc.ValidateAppName(name); err != nil {
		a.fail(w, r, badField("name", "want 1 to 64 of [A-Za-z0-9._-]"))
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	app, err := a.opts.Apps.GetApp(ctx, name)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, appView(app))
}

func (a *api) removeApp(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := keysvc.ValidateAppName(name); err != nil {
		a.fail(w, r, badField("name", "want 1 to 64 of [A-Za-z0-9._-]"))
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	if err := a.opts.Apps.RemoveApp(ctx, name); err != nil {
		a.fail(w, r, err)
		return
	}
	a.audit(r, "application removed", "app", name)
	w.WriteHeader(http.StatusNoContent)
}

// password returns n characters of [A-Za-z0-9], without modulo bias.
func (a *api) password(n int) (string, error) {
	out := make([]byte, 0, n)
	buf := make([]byte, 2*n)
	for len(out) < n {
		if err := a.opts.Rand(buf); err != nil {
			return "", err
		}
		for _, b := range buf {
			if int(b) < 256/len(appPasswordAlphabet)*len(appPasswordAlphabet) && len(out) < n {
				out = append(out, appPasswordAlphabet[int(b)%len(appPasswordAlphabet)])
			}
		}
	}
	return string(out), nil
}

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
//	GET    /v1/sessions                      connected clients
//	DELETE /v1/sessions/{client_id}          disconnect one
//	GET    /v1/apps                          application names
//	POST   /v1/apps                          add or replace an application
//	GET    /v1/apps/{name}                   one application (no password)
//	DELETE /v1/apps/{name}                   remove
//
// Errors are JSON {"error": "...", "field": "..."}: 400 bad input, 401 no
// or wrong token, 404 not found, 409 exists or busy, 503 store unavailable.
package admin

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Options configure the API.
type Options struct {
	Service      *keysvc.Service      // required
	Hook         *hook.Hook           // required: sessions and changes
	Token        string               // bearer token; required, at least 16 characters
	MetricsToken string               // bearer token for /metrics only (Token works there too); "" = Token alone
	Gatherer     prometheus.Gatherer  // served on /metrics; nil = no /metrics
	BrokerURL    string               // written into provisioning bundles
	Logger       *slog.Logger         // nil = slog.Default()
	MaxImport    int64                // largest CSV body, bytes; 0 = 1 GiB
	Timeout      time.Duration        // per store call outside imports; 0 = 30 s
	Now          func() time.Time     // nil = time.Now
	Rand         func(b []byte) error // nil = crypto/rand
}

type api struct {
	opts         Options
	token        [32]byte // SHA-256 of Options.Token
	metricsToken [32]byte // SHA-256 of Options.MetricsToken
	hasMetrics   int      // 1 if there is a metrics token
	log          *slog.Logger
}

// New returns the API's handler.
func New(opts Options) (http.Handler, error) {
	if opts.Service == nil || opts.Hook == nil {
		return nil, errors.New("admin: Service and Hook are required")
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
	a := &api{opts: opts, token: sha256.Sum256([]byte(opts.Token)), log: opts.Logger}
	if opts.MetricsToken != "" {
		a.metricsToken, a.hasMetrics = sha256.Sum256([]byte(opts.MetricsToken)), 1
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", a.healthz)
	if opts.Gatherer != nil {
		// The refusal reasons and binding events in the metrics tell which
		// identities exist: not for anyone who can reach the port.
		metrics := promhttp.HandlerFor(opts.Gatherer, promhttp.HandlerOpts{})
		mux.Handle("GET /metrics", a.require(a.mayReadMetrics, metrics.ServeHTTP))
	}
	auth := func(pattern string, h http.HandlerFunc) { mux.Handle(pattern, a.require(a.isAdmin, h)) }
	auth("POST /v1/terminals", a.register)
	auth("GET /v1/terminals", a.list)
	auth("POST /v1/terminals/import", a.importCSV)
	auth("GET /v1/terminals/{sn}", a.get)
	auth("DELETE /v1/terminals/{sn}", a.delete)
	auth("POST /v1/terminals/{sn}/disable", a.setStatus(keysvc.StatusDisabled))
	auth("POST /v1/terminals/{sn}/enable", a.setStatus(keysvc.StatusActive))
	auth("POST /v1/terminals/{sn}/rekey", a.rekey)
	auth("POST /v1/terminals/{sn}/changes", a.startChange)
	auth("GET /v1/terminals/{sn}/changes", a.changeStatus)
	auth("GET /v1/sessions", a.sessions)
	auth("DELETE /v1/sessions/{id}", a.disconnect)
	auth("GET /v1/apps", a.listApps)
	auth("POST /v1/apps", a.addApp)
	auth("GET /v1/apps/{name}", a.getApp)
	auth("DELETE /v1/apps/{name}", a.removeApp)
	mux.Handle("/", a.require(a.isAdmin, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, Error{Error: "no such endpoint: " + r.Method + " " + r.URL.Path})
	}))
	return mux, nil
}

// isAdmin reports whether sum is the hash of the admin token, in constant
// time (of the hashes, so the length does not leak either).
func (a *api) isAdmin(sum [32]byte) bool {
	return subtle.ConstantTimeCompare(sum[:], a.token[:]) == 1
}

// mayReadMetrics reports whether sum is the hash of the metrics token or of
// the admin token; both are compared, in constant time.
func (a *api) mayReadMetrics(sum [32]byte) bool {
	admin := subtle.ConstantTimeCompare(sum[:], a.token[:])
	metrics := subtle.ConstantTimeCompare(sum[:], a.metricsToken[:]) & a.hasMetrics
	return admin|metrics == 1
}

// require serves next to requests with "Authorization: Bearer <token>"
// whose token's SHA-256 allowed accepts, and 401 to the others.
func (a *api) require(allowed func(sum [32]byte) bool, next http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := r.Header.Get("Authorization")
		tok, ok := strings.CutPrefix(h, "Bearer ")
		sum := sha256.Sum256([]byte(strings.TrimSpace(tok)))
		if !ok || !allowed(sum) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="m2mguard"`)
			writeJSON(w, http.StatusUnauthorized, Error{Error: "missing or wrong bearer token"})
			a.log.Warn("admin request refused", "reason", "bad-token", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr)
			return
		}
		next(w, r)
	})
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
	status, body := http.StatusInternalServerError, Error{Error: "internal error (the broker's log has the details)"}
	switch {
	case errors.As(err, &fe):
		status, body = http.StatusBadRequest, Error{Error: fe.Error(), Field: fe.field}
	case errors.As(err, &mbe):
		status, body.Error = http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", mbe.Limit)
	case errors.As(err, &ce):
		status, body = http.StatusBadRequest, Error{Error: ce.Field + ": " + ce.Reason, Field: ce.Field}
		if ce.Field == "" {
			body.Error = ce.Reason
		}
	case errors.Is(err, keysvc.ErrInvalid):
		status, body.Error = http.StatusBadRequest, reason(err, keysvc.ErrInvalid)
	case errors.Is(err, keysvc.ErrNotFound):
		status, body.Error = http.StatusNotFound, subject+" not found"
	case errors.Is(err, hook.ErrNoSession):
		status, body.Error = http.StatusNotFound, "no connected client "+r.PathValue("id")
	case errors.Is(err, keysvc.ErrExists):
		status, body.Error = http.StatusConflict, subject+" already exists"
		if msg := err.Error(); !strings.HasSuffix(msg, keysvc.ErrExists.Error()) {
			body.Error = withoutLayer(msg) // it says more: which other name overlaps
		}
	case errors.Is(err, keysvc.ErrBusy):
		status, body.Error = http.StatusConflict, "a change is already pending for "+subject
	case errors.Is(err, keysvc.ErrInactive):
		status, body.Error = http.StatusConflict, subject+" is disabled"
	case errors.Is(err, keysvc.ErrConflict):
		status, body.Error = http.StatusConflict, subject+" was changed by another request at the same time; try again"
	case errors.Is(err, keysvc.ErrUnavailable), errors.Is(err, context.DeadlineExceeded):
		status, body.Error = http.StatusServiceUnavailable, "the broker's store is unavailable (the broker's log has the details)"
	case errors.Is(err, keysvc.ErrForbidden):
		status, body.Error = http.StatusServiceUnavailable, "the broker's store refused the request (the broker's log has the details)"
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
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
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
	_, err := a.opts.Service.Store().ListApps(ctx)
	if err == nil || errors.Is(err, keysvc.ErrNotFound) {
		writeJSON(w, http.StatusOK, Health{Status: "ok", Store: "ok"})
		return
	}
	// The error (store address, paths) goes to the log, not to whoever asks.
	a.log.Warn("health check: store unavailable", "err", err.Error())
	writeJSON(w, http.StatusServiceUnavailable, Health{Status: "unavailable", Store: "unavailable", Error: "the store does not answer"})
}

func (a *api) register(w http.ResponseWriter, r *http.Request) {
	var req RegisterRequest
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
	t, err := a.opts.Service.Register(ctx, rr)
	if err != nil {
		if errors.Is(err, keysvc.ErrExists) {
			writeJSON(w, http.StatusConflict, Error{Error: "terminal " + req.SN + " already exists", Field: "sn"})
			return
		}
		a.fail(w, r, err)
		return
	}
	a.log.Info("terminal registered", "sn", t.SN, "alg", t.Alg.String(), "remote", r.RemoteAddr)
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
	t, err := a.opts.Service.Get(ctx, sn)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, terminalView(t))
}

func (a *api) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	after := q.Get("after")
	if after != "" && codec.ValidateSN(after) != nil {
		a.fail(w, r, badField("after", "want a serial number (1 to 16 of [A-Za-z0-9])"))
		return
	}
	limit := 100
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 1000 {
			a.fail(w, r, badField("limit", "want 1 to 1000"))
			return
		}
		limit = n
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	ts, next, err := a.opts.Service.List(ctx, after, limit)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	out := TerminalList{Terminals: make([]Terminal, 0, len(ts)), Next: next}
	for _, t := range ts {
		out.Terminals = append(out.Terminals, terminalView(t))
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
	if err := a.opts.Service.Delete(ctx, sn); err != nil {
		a.fail(w, r, err)
		return
	}
	ended := a.opts.Hook.Revoke(sn, hook.RevokeDeleted)
	a.log.Info("terminal deleted", "sn", sn, "sessions_ended", ended, "remote", r.RemoteAddr)
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
			t, err := a.opts.Service.SetStatus(ctx, sn, st)
			if err != nil {
				a.fail(w, r, err)
				return
			}
			a.log.Info("terminal enabled", "sn", sn, "remote", r.RemoteAddr)
			writeJSON(w, http.StatusOK, terminalView(t))
			return
		}
		t, cancelled, err := a.opts.Service.Disable(ctx, sn)
		if err != nil {
			a.fail(w, r, err)
			return
		}
		ended := a.opts.Hook.Revoke(sn, hook.RevokeDisabled)
		attrs := []any{"sn", sn, "sessions_ended", ended, "remote", r.RemoteAddr}
		if cancelled != nil {
			attrs = append(attrs, "cancelled_change", cancelled.RID.String())
		}
		a.log.Info("terminal disabled", attrs...)
		writeJSON(w, http.StatusOK, terminalView(t))
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
	t, err := a.opts.Service.Rekey(ctx, sn)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ended := a.opts.Hook.Revoke(sn, hook.RevokeRekeyed)
	a.log.Info("terminal rekeyed", "sn", sn, "sessions_ended", ended, "status", string(t.Status), "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, bundleOf(t, a.opts.BrokerURL))
}

// importCSV streams NDJSON: a progress line after every batch, then the
// report. Errors found before anything was streamed (a bad header) get
// their own status code; later ones end the stream with an error line.
func (a *api) importCSV(w http.ResponseWriter, r *http.Request) {
	body := http.MaxBytesReader(w, r.Body, a.opts.MaxImport)
	started := false
	flusher, _ := w.(http.Flusher)
	enc := json.NewEncoder(w)
	start := func() {
		if !started {
			started = true
			w.Header().Set("Content-Type", "application/x-ndjson")
			w.Header().Set("Cache-Control", "no-store")
			w.WriteHeader(http.StatusOK)
		}
	}
	rep, err := a.opts.Service.Import(r.Context(), body, keysvc.ImportOptions{Progress: func(done, total int) {
		start()
		enc.Encode(ImportEvent{Progress: &Progress{Done: done, Total: total}})
		if flusher != nil {
			flusher.Flush()
		}
	}})
	out := &ImportReport{Rows: rep.Rows, Created: rep.Created, Rejected: make([]RowResult, 0, len(rep.Rejected))}
	for _, rr := range rep.Rejected {
		out.Rejected = append(out.Rejected, RowResult{Line: rr.Line, SN: rr.SN, Reason: rr.Reason})
	}
	a.log.Info("terminals imported", "rows", rep.Rows, "created", rep.Created, "rejected", len(rep.Rejected), "remote", r.RemoteAddr)
	if err != nil && !started {
		a.fail(w, r, err)
		return
	}
	start()
	ev := ImportEvent{Report: out}
	if err != nil {
		ev.Error = "the import stopped: the broker's store failed (the broker's log has the details)"
		if errors.Is(err, keysvc.ErrInvalid) {
			ev.Error = "the import stopped: " + reason(err, keysvc.ErrInvalid)
		}
		a.log.Error("import failed", "rows", rep.Rows, "created", rep.Created, "err", err.Error(), "remote", r.RemoteAddr)
	}
	enc.Encode(ev)
}

func (a *api) startChange(w http.ResponseWriter, r *http.Request) {
	sn, err := pathSN(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	var req ChangeRequest
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
	ch, err := a.opts.Hook.StartChange(ctx, sn, what)
	if err != nil {
		if errors.Is(err, keysvc.ErrBusy) {
			writeJSON(w, http.StatusConflict, Error{Error: "a change is already pending for " + sn})
			return
		}
		if errors.Is(err, keysvc.ErrInactive) {
			writeJSON(w, http.StatusConflict, Error{Error: "terminal " + sn + " is disabled: no credential change starts for it (rekey it out of band)"})
			return
		}
		a.fail(w, r, err)
		return
	}
	a.log.Info("credential change started", "sn", sn, "what", string(what), "rid", ch.RID.String(), "remote", r.RemoteAddr)
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
	t, err := a.opts.Service.Get(ctx, sn)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if t.Pending == nil || t.Pending.Expired(a.now()) {
		body := Error{Error: "no change pending for " + sn}
		if t.LastCommitted != 0 {
			body.Error += " (last committed rid " + t.LastCommitted.String() + ")"
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
	s := a.opts.Hook.Sessions()
	if s == nil {
		s = []hook.SessionInfo{}
	}
	writeJSON(w, http.StatusOK, struct {
		Sessions []hook.SessionInfo `json:"sessions"`
	}{s})
}

func (a *api) disconnect(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if id == "" || len(id) > 65535 {
		a.fail(w, r, badField("client_id", "want a client id"))
		return
	}
	if err := a.opts.Hook.Disconnect(id); err != nil {
		a.fail(w, r, err)
		return
	}
	a.log.Info("session disconnected", "client_id", id, "remote", r.RemoteAddr)
	w.WriteHeader(http.StatusNoContent)
}

func (a *api) listApps(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := a.ctx(r)
	defer cancel()
	names, err := a.opts.Service.ListApps(ctx)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if names == nil {
		names = []string{}
	}
	writeJSON(w, http.StatusOK, AppList{Apps: names})
}

const appPasswordAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

func (a *api) addApp(w http.ResponseWriter, r *http.Request) {
	var req AppRequest
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
	app, err := a.opts.Service.AddApp(ctx, keysvc.AddAppRequest{Name: req.Name, Password: []byte(req.Password), Subscribe: req.Subscribe, Publish: req.Publish})
	if err != nil {
		if errors.Is(err, keysvc.ErrInvalid) && strings.Contains(err.Error(), "topic filter") {
			writeJSON(w, http.StatusBadRequest, Error{Error: err.Error(), Field: "subscribe/publish"})
			return
		}
		a.fail(w, r, err)
		return
	}
	a.log.Info("application added", "app", app.Name, "remote", r.RemoteAddr)
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
	app, err := a.opts.Service.GetApp(ctx, name)
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
	if err := a.opts.Service.RemoveApp(ctx, name); err != nil {
		a.fail(w, r, err)
		return
	}
	a.log.Info("application removed", "app", name, "remote", r.RemoteAddr)
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

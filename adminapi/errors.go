package adminapi

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// Sentinels for errors.Is. An *Error matches the one of its status; the
// Client's own failures wrap ErrUnreachable, ErrNotAdminAPI,
// ErrImportStopped or ErrReportStopped. Their texts head messages an operator reads, so they
// carry no package prefix.
var (
	ErrBadRequest   = errors.New("bad request")  // 400 bad input, 413 body too large
	ErrUnauthorized = errors.New("unauthorized") // 401 missing or wrong token
	ErrForbidden    = errors.New("forbidden")    // 403 a read-only operator's change
	ErrNotFound     = errors.New("not found")    // 404
	ErrConflict     = errors.New("conflict")     // 409 exists, busy, or disabled
	ErrUnavailable  = errors.New("unavailable")  // 503 store unavailable (or 502, 504)

	// ErrUnreachable: no answer at all (connection refused, timeout, a
	// cancelled context; errors.Is finds the cause too).
	ErrUnreachable = errors.New("broker unreachable")
	// ErrNotAdminAPI: an answer, but not from an m2mguard admin API (a web
	// server's HTML page, another service on that port). See NotAdminAPIError.
	ErrNotAdminAPI = errors.New("not an m2mguard admin API")
	// ErrImportStopped: an import stopped after it had begun to store rows
	// (the store failed); the report of what was stored comes with it.
	ErrImportStopped = errors.New("the import stopped")
	// ErrReportStopped: a report stopped after it had begun to stream rows
	// (the store failed); the rows before it were whole.
	ErrReportStopped = errors.New("the report stopped")
)

// Error is an error answer of the admin API: the HTTP status and the JSON
// body {"error": "...", "field": "..."} every error answer has. The server
// writes it; the Client returns it (use errors.As, or errors.Is with the
// sentinels above).
type Error struct {
	Status  int    `json:"-"`               // HTTP status
	Message string `json:"error"`           // for an operator: "terminal A1 not found"
	Field   string `json:"field,omitempty"` // the request field at fault (400), if one is
}

// Error returns the message and the status, a bad request's message
// prefixed by the field at fault unless it names it already: "imei: want
// 14 to 16 digits (HTTP 400)".
func (e *Error) Error() string { return fmt.Sprintf("%s (HTTP %d)", e.Text(), e.Status) }

// Text is Error without the status.
func (e *Error) Text() string {
	msg := e.Message
	if msg == "" {
		msg = http.StatusText(e.Status)
	}
	if e.Status == http.StatusBadRequest && e.Field != "" && !strings.HasPrefix(msg, e.Field+":") {
		msg = e.Field + ": " + msg
	}
	return msg
}

// Is reports whether target is the sentinel of e's status.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrBadRequest:
		return e.Status == http.StatusBadRequest || e.Status == http.StatusRequestEntityTooLarge
	case ErrUnauthorized:
		return e.Status == http.StatusUnauthorized
	case ErrForbidden:
		return e.Status == http.StatusForbidden
	case ErrNotFound:
		return e.Status == http.StatusNotFound
	case ErrConflict:
		return e.Status == http.StatusConflict
	case ErrUnavailable:
		return e.Status == http.StatusServiceUnavailable || e.Status == http.StatusBadGateway || e.Status == http.StatusGatewayTimeout
	}
	return false
}

// NotAdminAPIError is an answer that does not come from an m2mguard admin
// API: its content type is not the JSON (or, for /metrics, the text) the
// API answers with. It matches ErrNotAdminAPI.
type NotAdminAPIError struct {
	BaseURL     string // the Client's base URL
	Method      string
	Path        string
	Status      int
	ContentType string // "" if the answer had none
}

// Error says what answered instead: "http://127.0.0.1:8080 is not an
// m2mguard admin API: got text/html (HTTP 404) for GET /v1/apps".
func (e *NotAdminAPIError) Error() string {
	ct := e.ContentType
	if ct == "" {
		ct = "no content type"
	}
	return fmt.Sprintf("%s is not an m2mguard admin API: got %s (HTTP %d) for %s %s", e.BaseURL, ct, e.Status, e.Method, e.Path)
}

// Is reports whether target is ErrNotAdminAPI.
func (e *NotAdminAPIError) Is(target error) bool { return target == ErrNotAdminAPI }

// Package adminapi is the admin HTTP API of an m2mguard broker as Go: the
// JSON types of every endpoint, and Client, which calls them with one
// typed method each. It imports only the standard library, so that
// operator tools (m2mctl) and integrations link neither the broker nor
// mochi-mqtt nor Prometheus.
//
// Errors: an error answer of the API is an *Error (status, message, field);
// errors.Is matches it against ErrNotFound, ErrConflict, ErrUnauthorized,
// ErrBadRequest and ErrUnavailable. No answer at all is ErrUnreachable; an
// answer that is not from an admin API (an HTML page: wrong address) is a
// *NotAdminAPIError, matching ErrNotAdminAPI.
//
// The server side is package broker/admin; README's "Admin API" section
// lists the endpoints.
package adminapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strings"
)

// Content types of the API's answers.
const (
	contentJSON    = "application/json"
	contentNDJSON  = "application/x-ndjson"
	contentMetrics = "text/plain"
)

// Bounds of what the Client reads from the server.
const (
	maxAnswer      = 64 << 20 // a JSON answer, an import stream's line, a scrape
	maxErrorAnswer = 64 << 10 // an error answer
)

// Options configure a Client. The zero value is ready to use.
type Options struct {
	// HTTPClient sends the requests; nil = http.DefaultClient. Its Timeout,
	// if any, bounds each request, an import's upload and stream included;
	// the context of each call bounds it too.
	HTTPClient *http.Client
	// MetricsToken is the bearer token Metrics sends (the broker's
	// admin.metrics_token_file); "" = the admin token.
	MetricsToken string
}

// Client calls the admin API of one broker. It is safe for concurrent use.
type Client struct {
	base         string // scheme://host[:port][/prefix], without a trailing slash
	token        string
	metricsToken string
	hc           *http.Client
}

// New returns a client of the admin API at baseURL (http:// or https://,
// host and port, and a path prefix if a proxy adds one; no user or
// password, which error messages would show) that sends token
// (the broker's admin.token_file) as its bearer token. An empty token is
// allowed: then only Health and, with Options.MetricsToken, Metrics work.
// opts may be nil.
func New(baseURL, token string, opts *Options) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, errors.New("adminapi: base URL: want http://host:port or https://host:port")
	}
	if opts == nil {
		opts = &Options{}
	}
	for _, tok := range []string{token, opts.MetricsToken} {
		if strings.ContainsFunc(tok, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			return nil, errors.New("adminapi: a token holds a control character (a line break?)")
		}
	}
	c := &Client{base: strings.TrimRight(u.String(), "/"), token: token, metricsToken: opts.MetricsToken, hc: opts.HTTPClient}
	if c.metricsToken == "" {
		c.metricsToken = token
	}
	if c.hc == nil {
		c.hc = http.DefaultClient
	}
	return c, nil
}

// request is one call of the API.
type request struct {
	method string
	path   string    // with the query, after the base URL
	body   io.Reader // nil = none
	ctype  string    // of body
	token  string    // "" = none
	accept string    // content type of a 2xx answer
}

// send sends r and returns its 2xx answer (the caller closes its body).
// Any other answer is an *Error; an answer of an unexpected content type
// a *NotAdminAPIError; no answer wraps ErrUnreachable.
func (c *Client) send(ctx context.Context, r request) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, r.method, c.base+r.path, r.body)
	if err != nil {
		return nil, fmt.Errorf("adminapi: %s %s: %w", r.method, r.path, err)
	}
	req.Header.Set("Accept", r.accept)
	if r.ctype != "" {
		req.Header.Set("Content-Type", r.ctype)
	}
	if r.token != "" {
		req.Header.Set("Authorization", "Bearer "+r.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL is in the message already
		}
		return nil, fmt.Errorf("%w: %s %s: %w", ErrUnreachable, r.method, c.base, err)
	}
	ok := resp.StatusCode/100 == 2
	want := r.accept
	if !ok {
		want = contentJSON // every error answer of the API, /metrics' and the import's too
	}
	if ct := mediaType(resp); resp.StatusCode != http.StatusNoContent && ct != want {
		resp.Body.Close()
		return nil, &NotAdminAPIError{BaseURL: c.base, Method: r.method, Path: r.path, Status: resp.StatusCode, ContentType: ct}
	}
	if ok {
		return resp, nil
	}
	defer resp.Body.Close()
	e := &Error{}
	data, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorAnswer))
	if json.Unmarshal(data, e) != nil {
		e = &Error{} // the status says enough
	}
	e.Status = resp.StatusCode
	return nil, e
}

// mediaType is the content type of resp without its parameters ("" if
// none or unparsable).
func mediaType(resp *http.Response) string {
	ct, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil {
		return ""
	}
	return ct
}

// do sends a call with the admin token and in as its JSON body (nil =
// none), and decodes the JSON answer into out (nil = discard it).
// call sends in (nil: no body) to path and returns the JSON answer as a T.
func call[T any](ctx context.Context, c *Client, method, path string, in any) (*T, error) {
	var out T
	if err := c.do(ctx, method, path, in, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	r := request{method: method, path: path, token: c.token, accept: contentJSON}
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("adminapi: %s %s: %w", method, path, err)
		}
		r.body, r.ctype = bytes.NewReader(data), contentJSON
	}
	resp, err := c.send(ctx, r)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		io.Copy(io.Discard, io.LimitReader(resp.Body, maxAnswer))
		return nil
	}
	data, err := readAll(resp.Body)
	if err == nil {
		err = json.Unmarshal(data, out)
	}
	if err != nil {
		return fmt.Errorf("adminapi: reading the answer of %s %s: %w", method, path, err)
	}
	return nil
}

// readAll reads r up to maxAnswer bytes; more is an error.
func readAll(r io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxAnswer+1))
	if err == nil && len(data) > maxAnswer {
		err = fmt.Errorf("larger than %d MiB", maxAnswer>>20)
	}
	return data, err
}

// seg escapes s as one path segment. "." and ".." are escaped too: as
// they are, the server would clean them out of the path.
func seg(s string) string {
	switch s {
	case ".":
		return "%2E"
	case "..":
		return "%2E%2E"
	}
	return url.PathEscape(s)
}

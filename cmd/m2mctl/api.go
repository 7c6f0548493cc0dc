package main

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
	"os"
	"strings"

	"github.com/m2mguard/m2mguard/broker/admin"
)

// errUnreachable: the admin API could not be reached.
var errUnreachable = errors.New("broker unreachable")

// errNotAdminAPI: the server answered, but not as an m2mguard admin API
// (another web server on --server's address, or a broker's MQTT port).
var errNotAdminAPI = errors.New("check --server (the broker's admin.listen; default " + DefaultServer + ")")

// apiError is an error answer of the admin API.
type apiError struct {
	status      int
	body        admin.Error
	tokenSource string // where the token came from (for 401)
}

func (e *apiError) Error() string { return fmt.Sprintf("%s (HTTP %d)", e.message(), e.status) }

// message is the error for an operator, without the status.
func (e *apiError) message() string {
	msg := e.body.Error
	if msg == "" {
		msg = http.StatusText(e.status)
	}
	if e.status == http.StatusBadRequest && e.body.Field != "" && !strings.HasPrefix(msg, e.body.Field+":") {
		msg = e.body.Field + ": " + msg
	}
	if e.status == http.StatusUnauthorized {
		msg = "the broker refused the admin token of " + e.tokenSource + " (check that it is this broker's admin.token)"
	}
	return msg
}

func (e *apiError) exitCode() int {
	switch e.status {
	case http.StatusBadRequest, http.StatusRequestEntityTooLarge:
		return exitUsage
	case http.StatusUnauthorized:
		return exitUnauthorize
	case http.StatusNotFound:
		return exitNotFound
	case http.StatusConflict:
		return exitConflict
	case http.StatusServiceUnavailable, http.StatusBadGateway, http.StatusGatewayTimeout:
		return exitUnavailable
	}
	return exitFailure
}

// apiClient is the admin API client of one command run.
type apiClient struct {
	base        string
	token       string
	tokenSource string // "--token", "$M2MCTL_TOKEN" or "token file PATH"
	http        *http.Client
}

// maxTokenFile bounds the token file read.
const maxTokenFile = 4 << 10

func newClient(o *options) (*apiClient, error) {
	u, err := url.Parse(o.server)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, usagef("--server: want http://host:port or https://host:port")
	}
	c := &apiClient{base: strings.TrimRight(o.server, "/"), http: &http.Client{Timeout: o.timeout}}
	if c.token = strings.TrimSpace(o.token); c.token != "" {
		c.tokenSource = o.tokenFrom
		return c, nil
	}
	c.tokenSource = "token file " + o.tokenFile
	f, err := os.Open(o.tokenFile)
	if err != nil {
		return nil, usagef("no admin token: give --token or $M2MCTL_TOKEN, or --token-file (%v)", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxTokenFile+1))
	if err != nil {
		return nil, usagef("token file %s: %v", o.tokenFile, err)
	}
	defer clear(data)
	switch tok := strings.TrimSpace(string(data)); {
	case tok == "":
		return nil, usagef("token file %s is empty (the broker writes its token there on first run)", o.tokenFile)
	case len(data) > maxTokenFile || strings.ContainsAny(tok, " \t\r\n"):
		return nil, usagef("token file %s does not hold one token", o.tokenFile)
	default:
		c.token = tok
	}
	return c, nil
}

// do sends a request; body is JSON-encoded unless it is an io.Reader. A
// non-2xx answer is an *apiError. out, if not nil, receives the JSON answer.
func (c *apiClient) do(ctx context.Context, method, path string, body any, out any) error {
	resp, err := c.send(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("reading the answer of %s %s: %w", method, path, err)
	}
	return nil
}

// send sends a request and returns a 2xx response (the caller closes it).
func (c *apiClient) send(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	ctype := ""
	switch b := body.(type) {
	case nil:
	case io.Reader:
		rd, ctype = b, "text/csv"
	default:
		data, err := json.Marshal(b)
		if err != nil {
			return nil, err
		}
		rd, ctype = bytes.NewReader(data), "application/json"
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("Accept", "application/json")
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %s %s: %v", errUnreachable, method, c.base, errors.Unwrap(err))
	}
	if ct := contentType(resp); resp.StatusCode != http.StatusNoContent && ct != "application/json" && ct != "application/x-ndjson" {
		resp.Body.Close()
		if ct == "" {
			ct = "no content type"
		}
		return nil, fmt.Errorf("%s is not an m2mguard admin API: got %s (HTTP %d) for %s %s; %w",
			c.base, ct, resp.StatusCode, method, path, errNotAdminAPI)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		ae := &apiError{status: resp.StatusCode, tokenSource: c.tokenSource}
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if json.Unmarshal(data, &ae.body) != nil {
			ae.body = admin.Error{}
		}
		return nil, ae
	}
	return resp, nil
}

// contentType is the media type of resp, without parameters.
func contentType(resp *http.Response) string {
	ct, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil {
		return ""
	}
	return ct
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/m2mguard/m2mguard/broker/admin"
)

// errUnreachable: the admin API could not be reached.
var errUnreachable = errors.New("broker unreachable")

// apiError is an error answer of the admin API.
type apiError struct {
	status int
	body   admin.Error
}

func (e *apiError) Error() string {
	msg := e.body.Error
	if msg == "" {
		msg = http.StatusText(e.status)
	}
	if e.body.Field != "" && !strings.HasPrefix(msg, e.body.Field+":") {
		msg = e.body.Field + ": " + msg
	}
	return fmt.Sprintf("%s (HTTP %d)", msg, e.status)
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
	base  string
	token string
	http  *http.Client
}

func newClient(o *options) (*apiClient, error) {
	u, err := url.Parse(o.server)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, usagef("--server: want http://host:port or https://host:port")
	}
	tok := strings.TrimSpace(o.token)
	if tok == "" {
		data, err := os.ReadFile(o.tokenFile)
		if err != nil {
			return nil, usagef("no admin token: give --token or $M2MCTL_TOKEN, or --token-file (%v)", err)
		}
		tok = strings.TrimSpace(string(data))
	}
	return &apiClient{base: strings.TrimRight(o.server, "/"), token: tok, http: &http.Client{Timeout: o.timeout}}, nil
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
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		ae := &apiError{status: resp.StatusCode}
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if json.Unmarshal(data, &ae.body) != nil {
			ae.body.Error = strings.TrimSpace(string(data))
		}
		return nil, ae
	}
	return resp, nil
}

package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
)

// maxTokenFile bounds the token file read.
const maxTokenFile = 4 << 10

// client returns the admin API client of this run; --timeout bounds each
// request.
func (o *options) client() (*adminapi.Client, error) { return o.clientWithTimeout(o.timeout) }

// clientWithTimeout returns the admin API client of this run with timeout
// for each request (0 = none: an import's upload may take long; a cancel
// still ends it).
func (o *options) clientWithTimeout(timeout time.Duration) (*adminapi.Client, error) {
	token, err := o.loadToken()
	if err != nil {
		return nil, err
	}
	c, err := adminapi.New(o.server, token, &adminapi.Options{HTTPClient: &http.Client{Timeout: timeout}})
	if err != nil { // the token passed loadToken's checks: New refused the URL
		return nil, usagef("--server: want http://host:port or https://host:port")
	}
	return c, nil
}

// loadToken returns the admin token of --token / $M2MCTL_TOKEN, else of
// the token file, and notes where it came from in o.tokenSource.
func (o *options) loadToken() (string, error) {
	if tok := strings.TrimSpace(o.token); tok != "" {
		o.tokenSource = o.tokenFrom
		if strings.ContainsFunc(tok, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			return "", usagef("%s holds a control character", o.tokenFrom)
		}
		return tok, nil
	}
	o.tokenSource = "token file " + o.tokenFile
	f, err := os.Open(o.tokenFile)
	if err != nil {
		return "", usagef("no admin token: give --token or $M2MCTL_TOKEN, or --token-file (%v)", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxTokenFile+1))
	if err != nil {
		return "", usagef("token file %s: %v", o.tokenFile, err)
	}
	defer clear(data)
	switch tok := strings.TrimSpace(string(data)); {
	case tok == "":
		return "", usagef("token file %s is empty (the broker writes its token there on first run)", o.tokenFile)
	case len(data) > maxTokenFile || strings.ContainsFunc(tok, func(r rune) bool { return r <= ' ' || r == 0x7f }):
		return "", usagef("token file %s does not hold one token", o.tokenFile)
	default:
		return tok, nil
	}
}

// explain turns an error of the admin API into an operator's message: a
// refused token names where it came from (never the token), and an answer
// that is not from the admin API points to --server.
func (o *options) explain(err error) error {
	var ae *adminapi.Error
	switch {
	case errors.As(err, &ae) && ae.Status == http.StatusUnauthorized:
		ae.Message = "the broker refused the admin token of " + o.tokenSource + " (check that it is this broker's admin.token)"
	case errors.Is(err, adminapi.ErrNotAdminAPI):
		return fmt.Errorf("%w; check --server (the broker's admin.listen; default %s)", err, DefaultServer)
	}
	return err
}

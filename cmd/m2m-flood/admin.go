package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/codec"
)

// adminClient calls a broker's admin API with its bearer token.
type adminClient struct {
	api *adminapi.Client
	hc  *http.Client
}

func newAdminClient(addr, token string) (*adminClient, error) {
	// A transport of its own: a wedged call must not hold a connection
	// another call waits for.
	hc := &http.Client{Transport: &http.Transport{}}
	api, err := adminapi.New("http://"+addr, token, &adminapi.Options{HTTPClient: hc})
	if err != nil {
		return nil, err
	}
	return &adminClient{api: api, hc: hc}, nil
}

// close releases the client's idle connections.
func (a *adminClient) close() { a.hc.CloseIdleConnections() }

// register registers a terminal and returns it with its secrets.
func (a *adminClient) register(ctx context.Context, id codec.Identity) (*terminal, error) {
	b, err := a.api.Register(ctx, adminapi.RegisterRequest{SN: id.SN, IMEI: id.IMEI, IMSI: id.IMSI, Alg: "hs256"})
	if err != nil {
		return nil, fmt.Errorf("register %s: %w", id.SN, err)
	}
	bk, err := hex.DecodeString(b.BK)
	if err != nil || len(bk) != codec.BasicKeySize {
		return nil, fmt.Errorf("register %s: the bundle's bk is not %d bytes of hex", id.SN, codec.BasicKeySize)
	}
	return &terminal{id: id, up: []byte(b.Up), bk: bk}, nil
}

// importTerminals registers ts, secrets included, with one import (the
// CSV format of keysvc.Service.Import) and checks every row was created.
func (a *adminClient) importTerminals(ctx context.Context, ts []*terminal) error {
	var buf bytes.Buffer
	w := csv.NewWriter(&buf)
	w.Write([]string{"sn", "imei", "imsi", "msisdn", "alg", "up", "down", "bk"})
	for _, t := range ts {
		w.Write([]string{t.id.SN, t.id.IMEI, t.id.IMSI, "", "hs256", string(t.up), string(randomPassword()), hex.EncodeToString(t.bk)})
	}
	w.Flush()
	rep, err := a.api.ImportTerminals(ctx, &buf, nil)
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	if rep.Created != len(ts) {
		return fmt.Errorf("import: %d of %d terminals created (first rejection: %+v)", rep.Created, len(ts), rep.Rejected)
	}
	return nil
}

// sessions lists the broker's authenticated sessions.
func (a *adminClient) sessions(ctx context.Context) ([]adminapi.Session, error) {
	return a.api.Sessions(ctx)
}

// timedCall is an admin call (or a login) measured with a timeout.
type timedCall struct {
	MS       float64 `json:"ms"`        // how long it took (the timeout if it did not end)
	TimedOut bool    `json:"timed_out"` // it had not ended after the timeout
	Status   int     `json:"status,omitempty"`
	Error    string  `json:"error,omitempty"`
}

func (c timedCall) String() string {
	switch {
	case c.TimedOut:
		return fmt.Sprintf("no answer after %.0f ms (timed out)", c.MS)
	case c.Error != "":
		return fmt.Sprintf("%.1f ms, failed: %s", c.MS, c.Error)
	case c.Status != 0:
		return fmt.Sprintf("%.1f ms (%d)", c.MS, c.Status)
	}
	return fmt.Sprintf("%.1f ms", c.MS)
}

// disconnect calls DELETE /v1/sessions/{id} with a timeout.
func (a *adminClient) disconnect(ctx context.Context, id string, timeout time.Duration) timedCall {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	err := a.api.Disconnect(ctx, id)
	c := timedCall{MS: msSince(start), Status: http.StatusNoContent}
	var ae *adminapi.Error
	switch {
	case err == nil:
	case errors.As(err, &ae):
		c.Status, c.Error = ae.Status, ae.Error()
	case ended(ctx):
		c.Status, c.TimedOut = 0, true
	default:
		c.Status, c.Error = 0, err.Error()
	}
	return c
}

// metric returns the value of one sample of /metrics (name with its
// labels exactly as exposed, e.g. `m2mguard_sessions{kind="terminal"}`),
// read with the admin token; ok is false if it cannot be read.
func (a *adminClient) metric(ctx context.Context, sample string) (v float64, ok bool) {
	m, err := a.api.Metrics(ctx)
	if err != nil {
		return 0, false
	}
	return m.Value(sample)
}

func msSince(t time.Time) float64 { return float64(time.Since(t)) / float64(time.Millisecond) }

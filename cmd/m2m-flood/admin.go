package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/csv"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/m2mguard/m2mguard/broker/admin"
	"github.com/m2mguard/m2mguard/codec"
)

// adminClient calls a broker's admin API with its bearer token.
type adminClient struct {
	base  string // http://host:port
	token string
	hc    *http.Client
}

func newAdminClient(addr, token string) *adminClient {
	// A transport of its own: a wedged call must not hold a connection
	// another call waits for.
	return &adminClient{base: "http://" + addr, token: token, hc: &http.Client{Transport: &http.Transport{}}}
}

// close releases the client's idle connections.
func (a *adminClient) close() { a.hc.CloseIdleConnections() }

// do sends one request and decodes a 2xx JSON answer into out (nil: the
// body is discarded). A non-2xx answer is an error with its body's message.
func (a *adminClient) do(ctx context.Context, method, path string, body io.Reader, out any) (int, error) {
	req, err := http.NewRequestWithContext(ctx, method, a.base+path, body)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := a.hc.Do(req)
	if err != nil {
		return 0, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var e admin.Error
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(data))
		}
		return resp.StatusCode, fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, e.Error)
	}
	if out == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, err
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return resp.StatusCode, fmt.Errorf("%s %s: answer: %w", method, path, err)
	}
	return resp.StatusCode, nil
}

// register registers a terminal and returns it with its secrets.
func (a *adminClient) register(ctx context.Context, id codec.Identity) (*terminal, error) {
	body, _ := json.Marshal(admin.RegisterRequest{SN: id.SN, IMEI: id.IMEI, IMSI: id.IMSI, Alg: "hs256"})
	var b admin.Bundle
	if _, err := a.do(ctx, http.MethodPost, "/v1/terminals", bytes.NewReader(body), &b); err != nil {
		return nil, err
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
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.base+"/v1/terminals/import", &buf)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	req.Header.Set("Content-Type", "text/csv")
	resp, err := a.hc.Do(req)
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("import: %d %s", resp.StatusCode, bytes.TrimSpace(data))
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var ev admin.ImportEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("import: answer: %w", err)
		}
		switch {
		case ev.Error != "":
			return fmt.Errorf("import: %s", ev.Error)
		case ev.Report != nil:
			if ev.Report.Created != len(ts) {
				return fmt.Errorf("import: %d of %d terminals created (first rejection: %+v)", ev.Report.Created, len(ts), ev.Report.Rejected)
			}
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("import: %w", err)
	}
	return fmt.Errorf("import: no report")
}

// sessionInfo is the part of an admin session listing the suite reads.
type sessionInfo struct {
	ClientID string `json:"client_id"`
	Kind     string `json:"kind"`
	SN       string `json:"sn"`
}

// sessions lists the broker's authenticated sessions.
func (a *adminClient) sessions(ctx context.Context) ([]sessionInfo, error) {
	var out struct {
		Sessions []sessionInfo `json:"sessions"`
	}
	_, err := a.do(ctx, http.MethodGet, "/v1/sessions", nil, &out)
	return out.Sessions, err
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
	code, err := a.do(ctx, http.MethodDelete, "/v1/sessions/"+id, nil, nil)
	c := timedCall{MS: msSince(start), Status: code}
	if err != nil {
		if ended(ctx) {
			c.TimedOut = true
		} else {
			c.Error = err.Error()
		}
	}
	return c
}

// metric returns the value of one sample of /metrics (name with its
// labels exactly as exposed, e.g. `m2mguard_sessions{kind="terminal"}`),
// sending the admin token in case the endpoint wants one; ok is false if
// it cannot be read.
func (a *adminClient) metric(ctx context.Context, sample string) (v float64, ok bool) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.base+"/metrics", nil)
	if err != nil {
		return 0, false
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := a.hc.Do(req)
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, false
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, value, found := strings.Cut(sc.Text(), " ")
		if found && name == sample {
			f, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
			return f, err == nil
		}
	}
	return 0, false
}

func msSince(t time.Time) float64 { return float64(time.Since(t)) / float64(time.Millisecond) }

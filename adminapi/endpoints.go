package adminapi

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"iter"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Register registers a terminal with fresh credentials (POST
// /v1/terminals) and returns its provisioning bundle, the one answer that
// ever holds its secrets. ErrConflict if the serial number exists,
// ErrBadRequest for bad input (Error.Field names it).
func (c *Client) Register(ctx context.Context, r RegisterRequest) (*Bundle, error) {
	return call[Bundle](ctx, c, http.MethodPost, "/v1/terminals", r)
}

// GetTerminal returns a terminal's record, without secrets (ErrNotFound
// if there is none).
func (c *Client) GetTerminal(ctx context.Context, sn string) (*Terminal, error) {
	return call[Terminal](ctx, c, http.MethodGet, "/v1/terminals/"+seg(sn), nil)
}

// ListTerminals returns one page of terminals sorted by serial number:
// up to limit (1 to 1000; 0 = the server's default, 100) after the serial
// number after ("" = from the start). TerminalList.Next is the after of
// the next page, "" after the last one.
func (c *Client) ListTerminals(ctx context.Context, after string, limit int) (*TerminalList, error) {
	q := url.Values{}
	if after != "" {
		q.Set("after", after)
	}
	if limit != 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	path := "/v1/terminals"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	return call[TerminalList](ctx, c, http.MethodGet, path, nil)
}

// AllTerminals iterates over every terminal, fetching pages of pageSize
// (as ListTerminals' limit) as it goes. An error ends the iteration: it
// is yielded with a zero Terminal.
//
//	for t, err := range c.AllTerminals(ctx, 0) {
//		if err != nil {
//			return err
//		}
//		fmt.Println(t.SN, t.Status)
//	}
func (c *Client) AllTerminals(ctx context.Context, pageSize int) iter.Seq2[Terminal, error] {
	return func(yield func(Terminal, error) bool) {
		after := ""
		for {
			page, err := c.ListTerminals(ctx, after, pageSize)
			if err != nil {
				yield(Terminal{}, err)
				return
			}
			for _, t := range page.Terminals {
				if !yield(t, nil) {
					return
				}
			}
			if page.Next == "" {
				return
			}
			if page.Next <= after { // pages go up; anything else would never end
				yield(Terminal{}, fmt.Errorf("adminapi: GET /v1/terminals: the page after %q says the next starts after %q", after, page.Next))
				return
			}
			after = page.Next
		}
	}
}

// DisableTerminal disables a terminal: its live sessions end at once, its
// pending change is cancelled, its logins are refused. It returns the
// record.
func (c *Client) DisableTerminal(ctx context.Context, sn string) (*Terminal, error) {
	return c.terminalAction(ctx, sn, "disable")
}

// EnableTerminal enables a disabled terminal and returns the record.
func (c *Client) EnableTerminal(ctx context.Context, sn string) (*Terminal, error) {
	return c.terminalAction(ctx, sn, "enable")
}

func (c *Client) terminalAction(ctx context.Context, sn, action string) (*Terminal, error) {
	return call[Terminal](ctx, c, http.MethodPost, "/v1/terminals/"+seg(sn)+"/"+action, nil)
}

// RekeyTerminal replaces every credential of a terminal out of band
// (nothing is sent to it; its live sessions end, a pending change is
// cancelled, its status is kept) and returns the new provisioning bundle,
// once.
func (c *Client) RekeyTerminal(ctx context.Context, sn string) (*Bundle, error) {
	return call[Bundle](ctx, c, http.MethodPost, "/v1/terminals/"+seg(sn)+"/rekey", nil)
}

// DeleteTerminal deletes a terminal and ends its live sessions.
func (c *Client) DeleteTerminal(ctx context.Context, sn string) error {
	return c.do(ctx, http.MethodDelete, "/v1/terminals/"+seg(sn), nil, nil)
}

// ImportTerminals registers the terminals of a CSV body (header: sn, imei,
// imsi, and optionally msisdn, alg, up, down, bk, in any order) and
// returns the report: rows read, created, and each rejected row with its
// reason. progress, if not nil, is called as the broker reports rows read.
//
// A body the broker refuses before storing anything (a bad header, too
// large) is an *Error. If the store fails after rows were stored, the
// report of what was stored comes with an error wrapping
// ErrImportStopped.
func (c *Client) ImportTerminals(ctx context.Context, csv io.Reader, progress func(Progress)) (*ImportReport, error) {
	return c.Import(ctx, csv, ImportOptions{Progress: progress})
}

// ImportOptions are the callbacks of Import; the zero value is
// ImportTerminals without progress.
type ImportOptions struct {
	// Progress, if set, is called as the broker reports rows read.
	Progress func(Progress)
	// Bundle, if set, asks the broker for the provisioning bundle of each
	// terminal it stores (?creds=true) and is called with each, in file
	// order, as they arrive: the one time the generated secrets are
	// shown. An error of Bundle ends the import (the broker stops after the
	// batch it is storing; the terminals it stored are in the registry,
	// their bundles not all handed on).
	Bundle func(Bundle) error
}

// Import is ImportTerminals with the options of opts: with opts.Bundle,
// the broker returns the secrets of the terminals it stores.
func (c *Client) Import(ctx context.Context, csv io.Reader, opts ImportOptions) (*ImportReport, error) {
	path := "/v1/terminals/import"
	if opts.Bundle != nil {
		path += "?creds=true"
	}
	resp, err := c.send(ctx, request{method: http.MethodPost, path: path, body: csv, ctype: "text/csv",
		token: c.token, accept: contentNDJSON})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), maxAnswer)
	for sc.Scan() {
		var ev ImportEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return nil, fmt.Errorf("adminapi: reading the import stream: %w", err)
		}
		if ev.Bundle != nil && opts.Bundle != nil {
			if err := opts.Bundle(*ev.Bundle); err != nil {
				return nil, fmt.Errorf("adminapi: import: handing on the credentials of %s: %w", ev.Bundle.SN, err)
			}
		}
		if ev.Progress != nil && opts.Progress != nil {
			opts.Progress(*ev.Progress)
		}
		switch {
		case ev.Report != nil && ev.Error != "":
			return ev.Report, fmt.Errorf("%w: %s", ErrImportStopped, strings.TrimPrefix(ev.Error, ErrImportStopped.Error()+": "))
		case ev.Report != nil:
			return ev.Report, nil
		case ev.Error != "":
			return nil, fmt.Errorf("%w: %s", ErrImportStopped, strings.TrimPrefix(ev.Error, ErrImportStopped.Error()+": "))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("adminapi: reading the import stream: %w", err)
	}
	return nil, errors.New("adminapi: the import stream ended without a report")
}

// Report streams a report of the registry (GET /v1/reports/{kind}): row is
// called with each terminal it lists, in serial number order, as the
// broker finds them (an error of row ends the report), and progress, if
// not nil, after each page the broker looked at. It returns the whole
// report's counts. The broker holds one page of the registry at a time,
// so a report of any fleet streams in constant memory on both sides. An
// error after rows were streamed wraps ErrReportStopped.
func (c *Client) Report(ctx context.Context, q ReportQuery, row func(ReportRow) error, progress func(ReportProgress)) (ReportProgress, error) {
	v := url.Values{}
	if !q.Before.IsZero() {
		v.Set("before", q.Before.UTC().Format(time.RFC3339))
	}
	if !q.Since.IsZero() {
		v.Set("since", q.Since.UTC().Format(time.RFC3339))
	}
	path := "/v1/reports/" + seg(q.Kind)
	if len(v) > 0 {
		path += "?" + v.Encode()
	}
	resp, err := c.send(ctx, request{method: http.MethodGet, path: path, token: c.token, accept: contentNDJSON})
	if err != nil {
		return ReportProgress{}, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), maxAnswer)
	for sc.Scan() {
		var ev ReportEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return ReportProgress{}, fmt.Errorf("adminapi: reading the report stream: %w", err)
		}
		switch {
		case ev.Row != nil:
			if err := row(*ev.Row); err != nil {
				return ReportProgress{}, err
			}
		case ev.Progress != nil:
			if progress != nil {
				progress(*ev.Progress)
			}
		case ev.Done != nil:
			return *ev.Done, nil
		case ev.Error != "":
			return ReportProgress{}, fmt.Errorf("%w: %s", ErrReportStopped, ev.Error)
		}
	}
	if err := sc.Err(); err != nil {
		return ReportProgress{}, fmt.Errorf("adminapi: reading the report stream: %w", err)
	}
	return ReportProgress{}, fmt.Errorf("%w: the stream ended before its last line", ErrReportStopped)
}

// WhoAmI returns the name and role of the client's token (GET
// /v1/whoami).
func (c *Client) WhoAmI(ctx context.Context) (*Operator, error) {
	return call[Operator](ctx, c, http.MethodGet, "/v1/whoami", nil)
}

// StartChange starts a platform-initiated credential change of a terminal:
// what is pwd, bk or all. The broker picks the mode and delivers at once if
// the terminal is online, else after its next login. ErrConflict if a
// change is pending or the terminal is disabled.
func (c *Client) StartChange(ctx context.Context, sn, what string) (*Change, error) {
	return call[Change](ctx, c, http.MethodPost, "/v1/terminals/"+seg(sn)+"/changes", ChangeRequest{What: what})
}

// PendingChange returns the pending change of a terminal (its metadata,
// never its new values); ErrNotFound if none is pending (the message
// names the last committed one) or there is no such terminal.
func (c *Client) PendingChange(ctx context.Context, sn string) (*Change, error) {
	return call[Change](ctx, c, http.MethodGet, "/v1/terminals/"+seg(sn)+"/changes", nil)
}

// Sessions lists the connected, authenticated clients, sorted by ClientID
// (in fleet mode, of every broker; SessionList also has the warnings).
func (c *Client) Sessions(ctx context.Context) ([]Session, error) {
	l, err := c.SessionList(ctx)
	if err != nil {
		return nil, err
	}
	return l.Sessions, nil
}

// SessionList is Sessions with the warnings of a fleet's list: brokers
// that did not answer, or the fleet unreachable.
func (c *Client) SessionList(ctx context.Context) (*SessionList, error) {
	return call[SessionList](ctx, c, http.MethodGet, "/v1/sessions", nil)
}

// Disconnect ends the connection of a client (ErrNotFound if none is
// connected with that ClientID). A terminal may log in again at once;
// DisableTerminal keeps it out.
func (c *Client) Disconnect(ctx context.Context, clientID string) error {
	return c.do(ctx, http.MethodDelete, "/v1/sessions/"+seg(clientID), nil, nil)
}

// Apps returns the names of the applications, sorted.
func (c *Client) Apps(ctx context.Context) ([]string, error) {
	var l AppList
	if err := c.do(ctx, http.MethodGet, "/v1/apps", nil, &l); err != nil {
		return nil, err
	}
	return l.Apps, nil
}

// GetApp returns an application, without its password.
func (c *Client) GetApp(ctx context.Context, name string) (*App, error) {
	return call[App](ctx, c, http.MethodGet, "/v1/apps/"+seg(name), nil)
}

// AddApp adds or replaces an application. Without r.Password the broker
// generates one and returns it in App.Password, once. ErrConflict if the
// name overlaps another application's ("dash" and "dash-east").
func (c *Client) AddApp(ctx context.Context, r AppRequest) (*App, error) {
	return call[App](ctx, c, http.MethodPost, "/v1/apps", r)
}

// RemoveApp removes an application (its connected clients keep their
// session until they disconnect).
func (c *Client) RemoveApp(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/apps/"+seg(name), nil, nil)
}

// Health asks GET /healthz, which needs no token, whether the broker's
// store answers. An unavailable store is an *Error matching
// ErrUnavailable (its message is a fixed text; the broker logs the cause).
func (c *Client) Health(ctx context.Context) (*Health, error) {
	resp, err := c.send(ctx, request{method: http.MethodGet, path: "/healthz", accept: contentJSON})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var h Health
	data, err := readAll(resp.Body)
	if err == nil {
		err = json.Unmarshal(data, &h)
	}
	if err != nil {
		return nil, fmt.Errorf("adminapi: reading the answer of GET /healthz: %w", err)
	}
	return &h, nil
}

// Metrics scrapes /metrics with the metrics token (Options.MetricsToken,
// else the admin token).
func (c *Client) Metrics(ctx context.Context) (Metrics, error) {
	resp, err := c.send(ctx, request{method: http.MethodGet, path: "/metrics", token: c.metricsToken, accept: contentMetrics})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := readAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("adminapi: reading the answer of GET /metrics: %w", err)
	}
	return Metrics(data), nil
}

// StartCampaign starts a fleet-wide credential change (POST
// /v1/campaigns): the broker walks the selection in serial-number order
// and starts a change for each terminal at the rate asked for.
// ErrConflict if another campaign is still starting changes,
// ErrBadRequest for a bad selection or a rate above the broker's maximum.
func (c *Client) StartCampaign(ctx context.Context, r CampaignRequest) (*Campaign, error) {
	return call[Campaign](ctx, c, http.MethodPost, "/v1/campaigns", r)
}

// Campaign returns a campaign and its progress.
func (c *Client) Campaign(ctx context.Context, id string) (*Campaign, error) {
	return call[Campaign](ctx, c, http.MethodGet, "/v1/campaigns/"+seg(id), nil)
}

// Campaigns lists every campaign, sorted by id.
func (c *Client) Campaigns(ctx context.Context) ([]Campaign, error) {
	var l CampaignList
	if err := c.do(ctx, http.MethodGet, "/v1/campaigns", nil, &l); err != nil {
		return nil, err
	}
	return l.Campaigns, nil
}

// CancelCampaign stops a campaign from starting more changes; those
// started go on and are counted. ErrConflict if it is done already.
func (c *Client) CancelCampaign(ctx context.Context, id string) (*Campaign, error) {
	return call[Campaign](ctx, c, http.MethodPost, "/v1/campaigns/"+seg(id)+"/cancel", nil)
}

// CampaignTerminals returns one page of the terminals a campaign handled,
// sorted by serial number: those of outcome ("" = all), after the serial
// number after, up to limit (1 to 1000; 0 = the server's default, 100).
func (c *Client) CampaignTerminals(ctx context.Context, id, outcome, after string, limit int) (*CampaignTerminalList, error) {
	q := url.Values{}
	if outcome != "" {
		q.Set("outcome", outcome)
	}
	if after != "" {
		q.Set("after", after)
	}
	if limit != 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	path := "/v1/campaigns/" + seg(id) + "/terminals"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	return call[CampaignTerminalList](ctx, c, http.MethodGet, path, nil)
}

// AllCampaignTerminals iterates over the terminals of a campaign with
// outcome ("" = all), fetching pages as it goes. An error ends the
// iteration: it is yielded with a zero CampaignTerminal.
func (c *Client) AllCampaignTerminals(ctx context.Context, id, outcome string) iter.Seq2[CampaignTerminal, error] {
	return func(yield func(CampaignTerminal, error) bool) {
		after := ""
		for {
			page, err := c.CampaignTerminals(ctx, id, outcome, after, 1000)
			if err != nil {
				yield(CampaignTerminal{}, err)
				return
			}
			for _, t := range page.Terminals {
				if !yield(t, nil) {
					return
				}
			}
			if page.Next == "" {
				return
			}
			if page.Next <= after {
				yield(CampaignTerminal{}, fmt.Errorf("adminapi: GET /v1/campaigns/%s/terminals: the page after %q says the next starts after %q", id, after, page.Next))
				return
			}
			after = page.Next
		}
	}
}

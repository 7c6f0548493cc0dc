package admin

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// reportPage is how many records a report reads from the registry at a
// time: the most it holds, however large the fleet.
const reportPage = 1000

// reportFilter decides whether a terminal is in a report, and fills in
// what the report says of it.
type reportFilter func(t *keysvc.Terminal, row *adminapi.ReportRow) bool

// report streams a report as NDJSON (adminapi.ReportEvent): the rows as it
// finds them, a progress line after each page of the registry, then the
// done line with the counts. It walks the registry a page at a time, so
// neither the broker nor the client holds the fleet. Bad parameters are a
// 400 before the stream; a store failure after it began ends the stream
// with an error line (a client that sees no done line knows the report is
// incomplete).
func (a *api) report(w http.ResponseWriter, r *http.Request) {
	keep, err := a.reportFilter(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	enc := json.NewEncoder(w)
	rc := http.NewResponseController(w)
	started := false
	var count adminapi.ReportProgress
	for after := ""; ; {
		ctx, cancel := a.ctx(r)
		ts, next, err := a.opts.Terminals.List(ctx, after, reportPage)
		cancel()
		if err != nil {
			if !started {
				a.fail(w, r, err)
				return
			}
			a.log.Error("report stopped", "kind", r.PathValue("kind"), "scanned", count.Scanned, "err", err.Error(), "operator", operatorOf(r.Context()).Name)
			enc.Encode(adminapi.ReportEvent{Error: "the broker's store failed after " + strconv.Itoa(count.Scanned) + " terminals (the broker's log has the details)"})
			return
		}
		if !started {
			started = true
			w.Header().Set("Content-Type", "application/x-ndjson")
			w.Header().Set("Cache-Control", "no-store")
			w.WriteHeader(http.StatusOK)
		}
		for _, t := range ts {
			count.Scanned++
			row := adminapi.ReportRow{SN: t.SN, Status: string(t.Status), UpExp: t.Creds.UpExp, DownExp: t.Creds.DownExp,
				BKExp: t.Creds.BKExp, LastSeen: a.lastSeen(t.SN)}
			if !keep(t, &row) {
				continue
			}
			count.Matched++
			if err := enc.Encode(adminapi.ReportEvent{Row: &row}); err != nil {
				return // the client went away
			}
		}
		progress := count
		if err := enc.Encode(adminapi.ReportEvent{Progress: &progress}); err != nil {
			return
		}
		rc.Flush()
		if next == "" || r.Context().Err() != nil {
			break
		}
		after = next
	}
	if r.Context().Err() != nil {
		return
	}
	enc.Encode(adminapi.ReportEvent{Done: &count})
}

// reportFilter reads the kind and parameters of a report request.
func (a *api) reportFilter(r *http.Request) (reportFilter, error) {
	q := r.URL.Query()
	date := func(name string) (time.Time, error) {
		v := q.Get(name)
		if v == "" {
			return time.Time{}, badField(name, "required: a date (2006-01-02, UTC) or an RFC 3339 time")
		}
		return parseDate(name, v)
	}
	switch kind := r.PathValue("kind"); kind {
	case adminapi.ReportExpiring:
		before, err := date("before")
		if err != nil {
			return nil, err
		}
		limit := before.Unix()
		return func(t *keysvc.Terminal, row *adminapi.ReportRow) bool {
			for _, c := range []struct {
				name string
				exp  uint32
			}{{"up", t.Creds.UpExp}, {"down", t.Creds.DownExp}, {"bk", t.Creds.BKExp}} {
				if c.exp != codec.Never && int64(c.exp) < limit {
					row.Expiring = append(row.Expiring, c.name)
				}
			}
			return len(row.Expiring) > 0
		}, nil
	case adminapi.ReportNeverSeen:
		if a.opts.LastSeen == nil {
			return nil, badField("kind", "this broker keeps no last logins")
		}
		return func(_ *keysvc.Terminal, row *adminapi.ReportRow) bool { return row.LastSeen == nil }, nil
	case adminapi.ReportNotSeen:
		if a.opts.LastSeen == nil {
			return nil, badField("kind", "this broker keeps no last logins")
		}
		since, err := date("since")
		if err != nil {
			return nil, err
		}
		return func(_ *keysvc.Terminal, row *adminapi.ReportRow) bool {
			return row.LastSeen == nil || row.LastSeen.At.Before(since)
		}, nil
	default:
		return nil, badField("kind", "want %s, %s or %s", adminapi.ReportExpiring, adminapi.ReportNeverSeen, adminapi.ReportNotSeen)
	}
}

// parseDate reads a date (2006-01-02, midnight UTC) or an RFC 3339 time.
func parseDate(field, v string) (time.Time, error) {
	if len(v) > 64 {
		return time.Time{}, badField(field, "want a date (2006-01-02) or an RFC 3339 time")
	}
	if d, err := time.Parse(time.DateOnly, v); err == nil {
		return d, nil
	}
	t, err := time.Parse(time.RFC3339, v)
	if err != nil {
		return time.Time{}, badField(field, "want a date (2006-01-02) or an RFC 3339 time")
	}
	return t, nil
}

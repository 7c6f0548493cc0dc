package keysvc

import (
	"context"
	"encoding/csv"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/m2mguard/m2mguard/codec"
)

// ImportOptions tune Import.
type ImportOptions struct {
	// Progress, if set, is called after each batch with the data rows done
	// (stored, or rejected) and the data rows read; the last call has
	// done == total == ImportReport.Rows.
	Progress func(done, total int)
	// BatchSize is the number of records per store transaction when the
	// store implements BulkCreator; 0 = 1000.
	BatchSize int
	// Created, if set, is called with each terminal stored, in file order,
	// after its batch is stored and before Progress reports it. The record
	// holds the terminal's secrets (those of the file, and those
	// generated): the caller hands them on once (a factory's credentials
	// file) and keeps them nowhere else. An error stops the import.
	Created func(t *Terminal) error
}

// ImportReport is the outcome of Import: every data row is either created
// or listed in Rejected.
type ImportReport struct {
	Rows     int         // data rows read
	Created  int         // terminals stored
	Rejected []RowResult // rows not stored, in file order
}

// RowResult says why a row was not imported. Reason never holds a secret.
type RowResult struct {
	Line   int    // line number in the file (the header is line 1)
	SN     string // as given, if it was a valid sn
	Reason string
}

// MaxImportRows bounds one Import.
const MaxImportRows = 10_000_000

var importRequired = []string{"sn", "imei", "imsi"}
var importOptional = []string{"msisdn", "alg", "up", "down", "bk"}

// importColumns maps a header to column indexes (-1 = absent).
type importColumns map[string]int

func parseImportHeader(h []string) (importColumns, error) {
	cols := importColumns{}
	for _, n := range append(append([]string(nil), importRequired...), importOptional...) {
		cols[n] = -1
	}
	for i, name := range h {
		name = strings.ToLower(strings.TrimSpace(name))
		if i == 0 {
			name = strings.TrimPrefix(name, "\ufeff")
		}
		j, known := cols[name]
		if !known {
			return nil, fmt.Errorf("%w: import: unknown column %q", ErrInvalid, name)
		}
		if j >= 0 {
			return nil, fmt.Errorf("%w: import: column %q twice", ErrInvalid, name)
		}
		cols[name] = i
	}
	for _, n := range importRequired {
		if cols[n] < 0 {
			return nil, fmt.Errorf("%w: import: missing column %q (header must name %s, optionally %s)",
				ErrInvalid, n, strings.Join(importRequired, ","), strings.Join(importOptional, ","))
		}
	}
	return cols, nil
}

// importRow is a parsed data row.
type importRow struct {
	req   RegisterRequest
	creds Credentials // nil fields are generated
}

// parseImportRow parses one data row. Errors name the field, never its
// value (up, down and bk are secrets).
func parseImportRow(cols importColumns, rec []string) (importRow, error) {
	get := func(n string) string {
		if i := cols[n]; i >= 0 && i < len(rec) {
			return strings.TrimSpace(rec[i])
		}
		return ""
	}
	var r importRow
	r.req = RegisterRequest{SN: get("sn"), IMEI: get("imei"), IMSI: get("imsi"), MSISDN: get("msisdn")}
	if err := (codec.Identity{SN: r.req.SN, IMEI: r.req.IMEI, IMSI: r.req.IMSI}).Validate(); err != nil {
		return r, err
	}
	if !validMSISDN(r.req.MSISDN) {
		return r, errors.New("msisdn: want 3 to 15 digits, optionally after '+'")
	}
	switch a := strings.ToLower(get("alg")); a {
	case "":
		r.req.Alg = codec.HS256
	default:
		alg, err := codec.ParseAlg(a)
		if err != nil {
			return r, errors.New("alg: want md5 or hs256")
		}
		r.req.Alg = alg
	}
	up, down := get("up"), get("down")
	if (up == "") != (down == "") {
		return r, errors.New("up, down: give both passwords or neither")
	}
	if up != "" {
		if err := codec.ValidatePassword("up", []byte(up)); err != nil {
			return r, err
		}
		if err := codec.ValidatePassword("down", []byte(down)); err != nil {
			return r, err
		}
		r.creds.Up, r.creds.UpExp = []byte(up), codec.Never
		r.creds.Down, r.creds.DownExp = []byte(down), codec.Never
	}
	if bk := get("bk"); bk != "" {
		k, err := hex.DecodeString(bk)
		if err != nil || len(k) != codec.BasicKeySize || strings.ToLower(bk) != bk {
			return r, fmt.Errorf("bk: want %d lower-case hex digits", 2*codec.BasicKeySize)
		}
		r.creds.BK, r.creds.BKExp = k, codec.Never
	}
	return r, nil
}

// Import registers terminals from CSV: a header naming sn, imei and imsi
// (any order; optional msisdn, alg, up, down, bk), then one terminal per
// row. Empty alg means hs256; empty up/down/bk are generated as by
// Register; given passwords follow the import rules of SPEC section 1 and
// bk is 64 lower-case hex digits; imported secrets never expire. Valid rows
// are stored, bad or duplicate rows are reported with their line and
// reason; nothing is lost silently. The error is non-nil only if the input
// cannot be read as CSV with a valid header or the store fails, and then
// the report says what was done before.
func (s *Service) Import(ctx context.Context, r io.Reader, opts ImportOptions) (ImportReport, error) {
	var rep ImportReport
	cr := csv.NewReader(r)
	cr.FieldsPerRecord = -1
	cr.ReuseRecord = false
	header, err := cr.Read()
	if err != nil {
		return rep, fmt.Errorf("keysvc: %w: import: cannot read the header: %w", ErrInvalid, err)
	}
	cols, err := parseImportHeader(header)
	if err != nil {
		return rep, fmt.Errorf("keysvc: %w", err)
	}
	var rows []pendingRow
	seen := map[string]int{}
	now := s.now1()
	for {
		rec, err := cr.Read()
		if err == io.EOF {
			break
		}
		line, _ := cr.FieldPos(0)
		var perr *csv.ParseError
		if errors.As(err, &perr) {
			rep.Rows++
			rep.Rejected = append(rep.Rejected, RowResult{Line: perr.StartLine, Reason: "csv: " + perr.Err.Error()})
			continue
		}
		if err != nil {
			return rep, fmt.Errorf("keysvc: import: read: %w", err)
		}
		rep.Rows++
		if rep.Rows > MaxImportRows {
			return rep, fmt.Errorf("keysvc: import: %w: more than %d rows", ErrInvalid, MaxImportRows)
		}
		if len(rec) != len(header) {
			rep.Rejected = append(rep.Rejected, RowResult{Line: line, Reason: fmt.Sprintf("want %d fields, got %d", len(header), len(rec))})
			continue
		}
		ir, err := parseImportRow(cols, rec)
		sn := ""
		if codec.ValidateSN(ir.req.SN) == nil {
			sn = ir.req.SN
		}
		if err != nil {
			rep.Rejected = append(rep.Rejected, RowResult{Line: line, SN: sn, Reason: err.Error()})
			continue
		}
		if first, dup := seen[sn]; dup {
			rep.Rejected = append(rep.Rejected, RowResult{Line: line, SN: sn, Reason: fmt.Sprintf("duplicate of line %d", first)})
			continue
		}
		seen[sn] = line
		t, err := s.newTerminal(ir.req, ir.creds, now)
		if err != nil {
			rep.Rejected = append(rep.Rejected, RowResult{Line: line, SN: sn, Reason: err.Error()})
			continue
		}
		rows = append(rows, pendingRow{line, t})
	}
	total := len(rows)
	// Progress counts every row read: those rejected above are done.
	rejectedEarly := len(rep.Rejected)
	if opts.Progress != nil && total == 0 && rep.Rows > 0 {
		opts.Progress(rep.Rows, rep.Rows)
	}
	batch := opts.BatchSize
	if batch <= 0 {
		batch = 1000
	}
	bulk, _ := s.store.(BulkCreator)
	reject := func(p pendingRow, err error) {
		reason := "exists"
		if !errors.Is(err, ErrExists) {
			reason = err.Error()
		}
		rep.Rejected = append(rep.Rejected, RowResult{Line: p.line, SN: p.t.SN, Reason: reason})
	}
	for i := 0; i < total; i += batch {
		chunk := rows[i:min(i+batch, total)]
		errs, err := s.createBatch(ctx, bulk, chunk)
		if err != nil {
			sortRejected(rep.Rejected)
			return rep, fmt.Errorf("keysvc: import: lines %d-%d: %w", chunk[0].line, chunk[len(chunk)-1].line, err)
		}
		var failed error // the store's failure: the import stops after this batch
		failedLine := 0
		for j, p := range chunk {
			s.cache.drop(p.t.SN) // a negative entry may be cached
			switch err := errs[j]; {
			case err == nil:
				rep.Created++
				s.written(p.t.SN, OpRegister)
				if opts.Created != nil && failed == nil {
					if err := opts.Created(p.t); err != nil {
						failed, failedLine = err, p.line
					}
				}
			case errors.Is(err, ErrExists) || errors.Is(err, ErrInvalid):
				reject(p, err)
			case failed == nil:
				failed, failedLine = err, p.line
			}
		}
		if failed != nil {
			sortRejected(rep.Rejected)
			return rep, fmt.Errorf("keysvc: import: line %d: %w", failedLine, failed)
		}
		if opts.Progress != nil {
			opts.Progress(rejectedEarly+i+len(chunk), rep.Rows)
		}
	}
	sortRejected(rep.Rejected)
	return rep, nil
}

func sortRejected(r []RowResult) {
	slices.SortStableFunc(r, func(a, b RowResult) int { return a.Line - b.Line })
}

// pendingRow is a parsed row of an import, waiting for its batch.
type pendingRow struct {
	line int
	t    *Terminal
}

// createBatch stores the terminals of chunk: with one CreateTerminals of
// bulk, else one CreateTerminal after another until the store fails (the
// rows not tried then get that error). It returns one error per row.
func (s *Service) createBatch(ctx context.Context, bulk BulkCreator, chunk []pendingRow) ([]error, error) {
	ts := make([]*Terminal, len(chunk))
	for j, p := range chunk {
		ts[j] = p.t
	}
	if bulk != nil {
		return bulk.CreateTerminals(ctx, ts)
	}
	errs := make([]error, len(ts))
	var failed error
	for j, t := range ts {
		if failed != nil {
			errs[j] = failed
			continue
		}
		errs[j] = s.store.CreateTerminal(ctx, t)
		if err := errs[j]; err != nil && !errors.Is(err, ErrExists) && !errors.Is(err, ErrInvalid) {
			failed = err
		}
	}
	return errs, nil
}

package admin_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/broker/admin"
	"github.com/m2mguard/m2mguard/internal/syncbuf"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/lastseen"
)

const (
	viewerToken = "viewer-token-0123456789abcdef"
	aliceToken  = "alice-token-0123456789abcdef"
)

func operators(t *testing.T) []admin.Operator {
	t.Helper()
	ops, err := admin.ParseOperators(strings.NewReader("# operators\n\n" +
		adminapi.OperatorLine("viewer", adminapi.RoleRead, viewerToken) + "\n" +
		adminapi.OperatorLine("alice", adminapi.RoleFull, aliceToken) + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	return ops
}

// newOperatorsEnv is newEnv with the operators viewer (read) and alice
// (full), the broker's last-seen table, and the API's log in logs.
func newOperatorsEnv(t *testing.T) (*env, *syncbuf.Buffer) {
	t.Helper()
	e := newEnv(t)
	logs := &syncbuf.Buffer{}
	return serve(t, e.b, admin.Options{Terminals: e.b.Service(), Apps: e.b.Service(), Sessions: e.b.Hook(),
		Operators: operators(t), LastSeen: e.b.LastSeen(), Logger: slog.New(slog.NewJSONHandler(logs, nil))}), logs
}

func TestParseOperators(t *testing.T) {
	t.Parallel()
	hash := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		name, file, err string
		n               int
	}{
		{name: "empty", file: "", n: 0},
		{name: "two", file: "# x\nalice full sha256:" + hash + "\n  bob read sha256:" + strings.Repeat("cd", 32) + "  \n", n: 2},
		{name: "crlf", file: "alice full sha256:" + hash + "\r\n", n: 1},
		{name: "role", file: "alice admin sha256:" + hash, err: "line 1: role of alice"},
		{name: "plain token", file: "alice full my-secret-token-0123456789", err: "never the token"},
		{name: "short hash", file: "alice full sha256:abcd", err: "64 lower-case hex"},
		{name: "upper hash", file: "alice full sha256:" + strings.ToUpper(hash), err: "64 lower-case hex"},
		{name: "not hex", file: "alice full sha256:" + strings.Repeat("zz", 32), err: "64 lower-case hex"},
		{name: "fields", file: "alice full", err: "want <name> <role> sha256:<hex>"},
		{name: "name", file: "al/ice full sha256:" + hash, err: "name: want"},
		{name: "admin", file: "# x\nadmin read sha256:" + hash, err: "line 2: name admin is the admin token's"},
		{name: "same name", file: "a full sha256:" + hash + "\na read sha256:" + strings.Repeat("cd", 32), err: "line 2: operator a is already on line 1"},
		{name: "same token", file: "a full sha256:" + hash + "\nb read sha256:" + hash, err: "line 2: the token of b is already line 1's"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ops, err := admin.ParseOperators(strings.NewReader(tc.file))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				if strings.Contains(err.Error(), hash) {
					t.Fatalf("the error shows the hash: %v", err)
				}
				return
			}
			if err != nil || len(ops) != tc.n {
				t.Fatalf("%d operators, %v; want %d", len(ops), err, tc.n)
			}
		})
	}
	if _, err := admin.ParseOperators(strings.NewReader(strings.Repeat("#", 1<<20+1))); err == nil {
		t.Fatal("a file over 1 MiB was read")
	}
}

// FuzzParseOperators: the parser never panics, and whatever it accepts
// has valid names and roles and round-trips through OperatorLine's format.
func FuzzParseOperators(f *testing.F) {
	f.Add(adminapi.OperatorLine("alice", "full", "tok") + "\n# c\nbob read sha256:" + strings.Repeat("0", 64))
	f.Add("x full sha256:")
	f.Fuzz(func(t *testing.T, file string) {
		ops, err := admin.ParseOperators(strings.NewReader(file))
		if err != nil {
			return
		}
		for _, op := range ops {
			line := fmt.Sprintf("%s %s sha256:%x", op.Name, op.Role, op.Hash)
			again, err := admin.ParseOperators(strings.NewReader(line))
			if err != nil || len(again) != 1 || again[0] != op {
				t.Fatalf("%+v does not round-trip: %v", op, err)
			}
		}
	})
}

// TestReadOnlyOperatorForbidden: a read-only operator's token gets 403 on
// every endpoint that changes something, and nothing changes; it reads
// what a full operator reads. The admin token and a full named token are
// not refused.
func TestReadOnlyOperatorForbidden(t *testing.T) {
	t.Parallel()
	e, logs := newOperatorsEnv(t)
	e.register(t1)
	changes := []struct{ method, path, body string }{
		{"POST", "/v1/terminals", `{"sn":"T2","imei":"354494040518571","imsi":"460020084678121"}`},
		{"POST", "/v1/terminals/import", "sn,imei,imsi\nT3,354494040518572,460020084678122\n"},
		{"POST", "/v1/terminals/import?creds=true", "sn,imei,imsi\nT3,354494040518572,460020084678122\n"},
		{"DELETE", "/v1/terminals/T1", ""},
		{"POST", "/v1/terminals/T1/disable", ""},
		{"POST", "/v1/terminals/T1/enable", ""},
		{"POST", "/v1/terminals/T1/rekey", ""},
		{"POST", "/v1/terminals/T1/changes", `{"what":"all"}`},
		{"DELETE", "/v1/sessions/T1", ""},
		{"POST", "/v1/apps", `{"name":"dash"}`},
		{"DELETE", "/v1/apps/dash", ""},
		{"PUT", "/v1/terminals/T1", "{}"},
		{"PATCH", "/v1/anything", "{}"},
	}
	for _, c := range changes {
		status, body := e.call(viewerToken, c.method, c.path, c.body)
		if status != http.StatusForbidden || !strings.Contains(string(body), "operator viewer may only read") {
			t.Errorf("viewer %s %s = %d %s, want 403", c.method, c.path, status, body)
		}
	}
	got, err := e.api.GetTerminal(t.Context(), "T1")
	if err != nil || got.Status != "active" || got.Pending != nil {
		t.Fatalf("T1 after the viewer's attempts: %+v %v", got, err)
	}
	if page, _ := e.api.ListTerminals(t.Context(), "", 10); len(page.Terminals) != 1 {
		t.Fatalf("the viewer's attempts registered terminals: %+v", page)
	}
	if apps, _ := e.api.Apps(t.Context()); len(apps) != 0 {
		t.Fatalf("the viewer's attempts added apps: %v", apps)
	}
	e.run([]step{
		{name: "viewer lists", method: "GET", path: "/v1/terminals", tok: viewerToken, status: 200, want: `"sn": "T1"`},
		{name: "viewer gets", method: "GET", path: "/v1/terminals/T1", tok: viewerToken, status: 200},
		{name: "viewer's change status", method: "GET", path: "/v1/terminals/T1/changes", tok: viewerToken, status: 404},
		{name: "viewer's sessions", method: "GET", path: "/v1/sessions", tok: viewerToken, status: 200},
		{name: "viewer's apps", method: "GET", path: "/v1/apps", tok: viewerToken, status: 200},
		{name: "viewer's report", method: "GET", path: "/v1/reports/never-seen", tok: viewerToken, status: 200, want: `"done"`},
		{name: "viewer's metrics", method: "GET", path: "/metrics", tok: viewerToken, status: 200, want: "go_goroutines"},
		{name: "viewer's unknown GET", method: "GET", path: "/v1/nothing", tok: viewerToken, status: 404},
		{name: "whoami viewer", method: "GET", path: "/v1/whoami", tok: viewerToken, status: 200, want: `"role": "read"`},
		{name: "whoami alice", method: "GET", path: "/v1/whoami", tok: aliceToken, status: 200, want: `"name": "alice"`},
		{name: "whoami admin", method: "GET", path: "/v1/whoami", status: 200, want: `"name": "admin"`},
		{name: "alice disables", method: "POST", path: "/v1/terminals/T1/disable", tok: aliceToken, status: 200},
		{name: "admin enables", method: "POST", path: "/v1/terminals/T1/enable", status: 200},
		{name: "the metrics token is no operator", method: "GET", path: "/v1/whoami", tok: metricsToken, status: 401},
	})
	refusals := 0
	for _, ev := range jsonLines(t, logs.String()) {
		if ev["msg"] == "admin request refused" && ev["reason"] == "read-only" && ev["operator"] == "viewer" {
			refusals++
		}
	}
	if refusals != len(changes) {
		t.Errorf("%d read-only refusals logged, want %d", refusals, len(changes))
	}
	for _, secret := range []string{viewerToken, aliceToken, token} {
		if strings.Contains(logs.String(), secret) {
			t.Fatal("a token is in the log")
		}
	}
}

// TestOperatorInAuditLines: every change names the operator who made it.
func TestOperatorInAuditLines(t *testing.T) {
	t.Parallel()
	e, logs := newOperatorsEnv(t)
	alice, err := adminapi.New(e.srv.URL, aliceToken, &adminapi.Options{HTTPClient: e.srv.Client()})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := alice.Register(ctx, t1); err != nil {
		t.Fatal(err)
	}
	steps := []func() error{
		func() error { _, err := alice.DisableTerminal(ctx, "T1"); return err },
		func() error { _, err := alice.EnableTerminal(ctx, "T1"); return err },
		func() error { _, err := alice.RekeyTerminal(ctx, "T1"); return err },
		func() error { _, err := alice.StartChange(ctx, "T1", "pwd"); return err },
		func() error {
			_, err := alice.ImportTerminals(ctx, strings.NewReader("sn,imei,imsi\nT2,354494040518571,460020084678121\n"), nil)
			return err
		},
		func() error { _, err := alice.AddApp(ctx, adminapi.AppRequest{Name: "dash"}); return err },
		func() error { return alice.RemoveApp(ctx, "dash") },
		func() error { return alice.DeleteTerminal(ctx, "T2") },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	want := map[string]bool{"terminal registered": false, "terminal disabled": false, "terminal enabled": false,
		"terminal rekeyed": false, "credential change started": false, "terminals imported": false,
		"application added": false, "application removed": false, "terminal deleted": false}
	for _, ev := range jsonLines(t, logs.String()) {
		msg, _ := ev["msg"].(string)
		if _, audit := want[msg]; audit {
			if ev["operator"] != "alice" || ev["remote"] == nil {
				t.Errorf("audit line %v does not name alice", ev)
			}
			want[msg] = true
		}
	}
	for msg, seen := range want {
		if !seen {
			t.Errorf("no audit line %q", msg)
		}
	}
}

// setExpiry sets every expiry of sn's credentials in the store.
func setExpiry(t *testing.T, e *env, sn string, exp uint32) {
	t.Helper()
	store := e.b.Service().Store()
	rec, err := store.GetTerminal(t.Context(), sn)
	if err != nil {
		t.Fatal(err)
	}
	rec.Creds.UpExp, rec.Creds.DownExp, rec.Creds.BKExp = exp, exp, exp
	if err := store.UpdateTerminal(t.Context(), rec); err != nil {
		t.Fatal(err)
	}
}

func jsonLines(t *testing.T, s string) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// TestReports: the three reports over a registry of several pages, with
// last logins from the broker's table.
func TestReports(t *testing.T) {
	t.Parallel()
	e, _ := newOperatorsEnv(t)
	ctx := t.Context()
	svc := e.b.Service()
	var csv strings.Builder
	csv.WriteString("sn,imei,imsi\n")
	const n = 2500 // three pages of the report's 1000
	for i := range n {
		fmt.Fprintf(&csv, "R%05d,354494040518570,460020084678120\n", i)
	}
	if rep, err := svc.Import(ctx, strings.NewReader(csv.String()), keysvc.ImportOptions{}); err != nil || rep.Created != n {
		t.Fatalf("import: %+v %v", rep, err)
	}
	// Registered terminals' generated credentials expire (keys.* lifetimes
	// are 0 here: never), so give two an expiry by hand.
	setExpiry(t, e, "R00007", 1_700_000_000)
	setExpiry(t, e, "R02400", 1_900_000_000)
	book := e.b.LastSeen()
	march := time.Date(2025, 3, 1, 0, 0, 0, 0, time.UTC)
	for i := range n {
		switch {
		case i%10 == 0: // seen lately
			book.Seen(fmt.Sprintf("R%05d", i), lastseen.Entry{At: march.Add(24 * time.Hour), Remote: "192.0.2.1:1000", Protocol: 4})
		case i%10 == 1: // seen long ago
			book.Seen(fmt.Sprintf("R%05d", i), lastseen.Entry{At: march.Add(-24 * time.Hour), Remote: "192.0.2.2:2000", Protocol: 5, SessionKey: true})
		}
	}
	collect := func(q adminapi.ReportQuery) ([]adminapi.ReportRow, adminapi.ReportProgress, int) {
		t.Helper()
		var rows []adminapi.ReportRow
		progress := 0
		done, err := e.api.Report(ctx, q, func(r adminapi.ReportRow) error { rows = append(rows, r); return nil },
			func(adminapi.ReportProgress) { progress++ })
		if err != nil {
			t.Fatalf("%s: %v", q.Kind, err)
		}
		return rows, done, progress
	}
	rows, done, progress := collect(adminapi.ReportQuery{Kind: adminapi.ReportNeverSeen})
	if len(rows) != n*8/10 || done.Scanned != n || done.Matched != len(rows) || progress != 3 {
		t.Fatalf("never-seen: %d rows, done %+v, %d progress lines", len(rows), done, progress)
	}
	rows, done, _ = collect(adminapi.ReportQuery{Kind: adminapi.ReportNotSeen, Since: march})
	if len(rows) != n*9/10 || done.Matched != len(rows) {
		t.Fatalf("not-seen: %d rows, done %+v", len(rows), done)
	}
	for _, r := range rows {
		if r.LastSeen != nil && (r.LastSeen.Protocol != 5 || !r.LastSeen.SessionKey || !r.LastSeen.At.Before(march)) {
			t.Fatalf("not-seen row %+v", r)
		}
	}
	rows, _, _ = collect(adminapi.ReportQuery{Kind: adminapi.ReportExpiring, Before: time.Unix(1_800_000_000, 0)})
	if len(rows) != 1 || rows[0].SN != "R00007" || strings.Join(rows[0].Expiring, ",") != "up,down,bk" {
		t.Fatalf("expiring before 2027: %+v", rows)
	}
	if rows, _, _ = collect(adminapi.ReportQuery{Kind: adminapi.ReportExpiring, Before: time.Unix(2_000_000_000, 0)}); len(rows) != 2 {
		t.Fatalf("expiring before 2033: %+v", rows)
	}
	e.run([]step{
		{name: "unknown report", method: "GET", path: "/v1/reports/everything", status: 400, field: "kind"},
		{name: "expiring without before", method: "GET", path: "/v1/reports/expiring", status: 400, field: "before"},
		{name: "bad date", method: "GET", path: "/v1/reports/not-seen?since=yesterday", status: 400, field: "since"},
		{name: "a date", method: "GET", path: "/v1/reports/not-seen?since=2025-03-01", status: 200, want: `"done"`},
	})
}

// TestImportReturnsCreds: with ?creds=true the bundle of every terminal
// stored is streamed, once; rejected rows have none, and without the flag
// no secret is in the answer.
func TestImportReturnsCreds(t *testing.T) {
	t.Parallel()
	e, logs := newOperatorsEnv(t)
	ctx := t.Context()
	const rows = "sn,imei,imsi,up,down\n" +
		"C1,354494040518570,460020084678120,,\n" +
		"C2,354494040518571,460020084678121,givenUplink01,givenDownlink01\n" +
		"C1,354494040518572,460020084678122,,\n"
	var bundles []adminapi.Bundle
	rep, err := e.api.Import(ctx, strings.NewReader(rows), adminapi.ImportOptions{Bundle: func(b adminapi.Bundle) error {
		bundles = append(bundles, b)
		return nil
	}})
	if err != nil || rep.Created != 2 || len(rep.Rejected) != 1 {
		t.Fatalf("import: %+v %v", rep, err)
	}
	if len(bundles) != 2 || bundles[0].SN != "C1" || len(bundles[0].Up) != 16 || len(bundles[0].BK) != 64 ||
		bundles[1].Up != "givenUplink01" || bundles[0].BrokerURL != e.b.PublicURL() {
		t.Fatalf("bundles %+v", bundles)
	}
	status, body := e.call(token, "POST", "/v1/terminals/import", "sn,imei,imsi\nC3,354494040518573,460020084678123\n")
	if status != 200 || strings.Contains(string(body), `"bundle"`) || strings.Contains(string(body), `"up"`) {
		t.Fatalf("import without creds: %d %s", status, body)
	}
	e.run([]step{{name: "bad creds flag", method: "POST", path: "/v1/terminals/import?creds=yes", body: "sn,imei,imsi\n", status: 400, field: "creds"}})
	for _, b := range bundles {
		if strings.Contains(logs.String(), b.Up) || strings.Contains(logs.String(), b.BK) {
			t.Fatal("a secret of the import is in the log")
		}
	}
	if !strings.Contains(logs.String(), `"credentials_returned":2`) {
		t.Errorf("the audit line does not count the credentials returned:\n%s", logs.String())
	}
}

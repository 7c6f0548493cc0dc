package main

import (
	"bufio"
	"bytes"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
)

// Operating a fleet (README): last seen, reports, named operators and the
// Vault inventory, each against the broker binary.

// m2mctl's exit codes the tests expect.
const (
	ctlRejected = 1 // an import rejected rows
	ctlUsage    = 2
)

// connectKept logs terminal b in with MQTT 3.1.1 and keeps the connection.
func connectKept(t *testing.T, addr string, b adminapi.Bundle) paho.Client {
	t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(b.SN).SetUsername(b.IMEI + ":" + b.IMSI).
		SetPassword(string(loginToken(t, b))).SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetProtocolVersion(4).SetConnectTimeout(10 * time.Second)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("login: %v", tok.Error())
	}
	return c
}

// buildCtl returns m2mctl, built with the broker bin (buildBinary).
func buildCtl(t *testing.T, bin string) string {
	t.Helper()
	if bin != buildBinary(t) {
		t.Fatalf("buildCtl: %s is not the broker buildBinary built", bin)
	}
	return brokerBinary.ctl
}

// runCtl runs m2mctl against the broker p with the admin token of work and
// returns its exit code, stdout and stderr.
func (p *process) runCtl(t *testing.T, ctl, work string, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(ctl, append([]string{"--server", p.admin, "--token-file", filepath.Join(work, "data", "admin.token")}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return ee.ExitCode(), stdout.String(), stderr.String()
	case err != nil:
		t.Fatal(err)
	}
	return 0, stdout.String(), stderr.String()
}

// metric returns the value of sample (name with labels, as exposed) in the
// broker's /metrics, read with the admin token.
func (p *process) metric(t *testing.T, work, sample string) float64 {
	t.Helper()
	m, err := adminClient(t, p.admin, work).Metrics(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	v, _ := m.Value(sample)
	return v
}

// TestLastSeenBinary: a terminal's last accepted login (time, address,
// MQTT version, session key) shows on GET /v1/terminals/{sn} and in the
// list; it survives a clean restart (written at shutdown) and a kill -9
// after the batch that holds it was flushed; lastseen.db is 0600.
func TestLastSeenBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	bin := buildBinary(t)
	work := t.TempDir()
	p := startBinary(t, bin, work)
	b := p.register(t, work, "S1")
	p.register(t, work, "S2")
	api := adminClient(t, p.admin, work)
	ctx := t.Context()
	if got, _ := api.GetTerminal(ctx, "S1"); got.LastSeen != nil {
		t.Fatalf("last seen before any login: %+v", got.LastSeen)
	}
	before := time.Now().Add(-time.Second)
	if code := connect(t, p.mqtt, b.SN, b.IMEI+":"+b.IMSI, loginToken(t, b)); code != 0 {
		t.Fatalf("login: %d", code)
	}
	got, err := api.GetTerminal(ctx, "S1")
	if err != nil || got.LastSeen == nil || got.LastSeen.Protocol != 4 || got.LastSeen.SessionKey ||
		!strings.HasPrefix(got.LastSeen.Remote, "127.0.0.1:") || got.LastSeen.At.Before(before) {
		t.Fatalf("last seen after a login: %+v %v", got.LastSeen, err)
	}
	page, _ := api.ListTerminals(ctx, "", 10)
	if page.Terminals[0].LastSeen == nil || page.Terminals[1].LastSeen != nil {
		t.Fatalf("list: %+v", page.Terminals)
	}
	first := *got.LastSeen

	p.terminate(t) // a clean shutdown writes what changed
	if fi, err := os.Stat(filepath.Join(work, "data", "lastseen.db")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("data/lastseen.db: %v %v, want 0600", fi, err)
	}
	p = startBinary(t, bin, work)
	api = adminClient(t, p.admin, work)
	if got, _ := api.GetTerminal(ctx, "S1"); got.LastSeen == nil || !got.LastSeen.At.Equal(first.At) || got.LastSeen.Remote != first.Remote {
		t.Fatalf("after a restart: %+v, want %+v", got.LastSeen, first)
	}

	// A login, its batch flushed (every 5 s), then kill -9: it is kept.
	flushed := p.metric(t, work, `m2mguard_last_seen_flushes_total{result="ok"}`)
	if code := connect(t, p.mqtt, b.SN, b.IMEI+":"+b.IMSI, loginToken(t, b)); code != 0 {
		t.Fatalf("second login: %d", code)
	}
	second, _ := api.GetTerminal(ctx, "S1")
	testwait.For(t, 20*time.Second, "a flush of the last-seen table", func() bool {
		return p.metric(t, work, `m2mguard_last_seen_flushes_total{result="ok"}`) > flushed
	})
	p.kill(t)
	p = startBinary(t, bin, work)
	api = adminClient(t, p.admin, work)
	if got, _ := api.GetTerminal(ctx, "S1"); got.LastSeen == nil || !got.LastSeen.At.Equal(second.LastSeen.At) {
		t.Fatalf("after kill -9 past a flush: %+v, want %+v", got.LastSeen, second.LastSeen)
	}
	if v := p.metric(t, work, "m2mguard_last_seen_terminals"); v != 1 {
		t.Fatalf("m2mguard_last_seen_terminals = %v, want 1", v)
	}
	// A deleted terminal registered again has never been seen.
	if err := api.DeleteTerminal(ctx, "S1"); err != nil {
		t.Fatal(err)
	}
	p.register(t, work, "S1")
	if got, _ := api.GetTerminal(ctx, "S1"); got.LastSeen != nil {
		t.Fatalf("a new S1 inherits the deleted one's last login: %+v", got.LastSeen)
	}
}

// TestReportsBinary: the three reports of a running broker.
func TestReportsBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	bin := buildBinary(t)
	work := t.TempDir()
	p := startBinary(t, bin, work, "--keys-password-lifetime", "720h", "--keys-key-lifetime", "2160h")
	var bundles []adminapi.Bundle
	for _, sn := range []string{"R1", "R2", "R3"} {
		bundles = append(bundles, p.register(t, work, sn))
	}
	b := bundles[1]
	if code := connect(t, p.mqtt, b.SN, b.IMEI+":"+b.IMSI, loginToken(t, b)); code != 0 {
		t.Fatalf("login: %d", code)
	}
	api := adminClient(t, p.admin, work)
	report := func(q adminapi.ReportQuery) string {
		t.Helper()
		var sns []string
		done, err := api.Report(t.Context(), q, func(r adminapi.ReportRow) error {
			sns = append(sns, r.SN+"("+strings.Join(r.Expiring, ",")+")")
			return nil
		}, nil)
		if err != nil || done.Scanned != 3 || done.Matched != len(sns) {
			t.Fatalf("%s: %v %+v", q.Kind, err, done)
		}
		return strings.Join(sns, " ")
	}
	now := time.Now()
	for _, tc := range []struct {
		q    adminapi.ReportQuery
		want string
	}{
		{adminapi.ReportQuery{Kind: adminapi.ReportNeverSeen}, "R1() R3()"},
		{adminapi.ReportQuery{Kind: adminapi.ReportNotSeen, Since: now.Add(-time.Hour)}, "R1() R3()"},
		{adminapi.ReportQuery{Kind: adminapi.ReportNotSeen, Since: now.Add(time.Hour)}, "R1() R2() R3()"},
		{adminapi.ReportQuery{Kind: adminapi.ReportExpiring, Before: now.Add(24 * time.Hour)}, ""},
		{adminapi.ReportQuery{Kind: adminapi.ReportExpiring, Before: now.Add(31 * 24 * time.Hour)}, "R1(up,down) R2(up,down) R3(up,down)"},
		{adminapi.ReportQuery{Kind: adminapi.ReportExpiring, Before: now.Add(91 * 24 * time.Hour)}, "R1(up,down,bk) R2(up,down,bk) R3(up,down,bk)"},
	} {
		if got := report(tc.q); got != tc.want {
			t.Errorf("%s %v %v: %q, want %q", tc.q.Kind, tc.q.Since, tc.q.Before, got, tc.want)
		}
	}

	// The same through m2mctl: CSV and JSON, and the last login in
	// terminal get and list.
	ctl := buildCtl(t, bin)
	code, out, errs := p.runCtl(t, ctl, work, "report", "never-seen", "-o", "csv", "--progress", "always")
	if rows, err := csv.NewReader(strings.NewReader(out)).ReadAll(); code != 0 || err != nil || len(rows) != 3 ||
		strings.Join(rows[0], ",") != "sn,status,upexp,downexp,bkexp,expiring,last_seen,remote,protocol,session_key" ||
		rows[1][0] != "R1" || rows[2][0] != "R3" || !strings.Contains(errs, "scanned 3 terminals, 2 in the report") {
		t.Fatalf("m2mctl report never-seen -o csv: exit %d %v\n%s\n%s", code, err, out, errs)
	}
	code, out, errs = p.runCtl(t, ctl, work, "report", "not-seen", "--since", now.Add(time.Hour).UTC().Format(time.RFC3339), "-o", "json")
	var rows []adminapi.ReportRow
	if err := json.Unmarshal([]byte(out), &rows); code != 0 || err != nil || len(rows) != 3 || rows[1].SN != "R2" ||
		rows[1].LastSeen == nil || rows[1].LastSeen.Protocol != 4 || rows[0].LastSeen != nil {
		t.Fatalf("m2mctl report not-seen -o json: exit %d %v\n%s\n%s", code, err, out, errs)
	}
	code, out, errs = p.runCtl(t, ctl, work, "report", "expiring", "--before", now.Add(31*24*time.Hour).UTC().Format("2006-01-02"), "-o", "csv")
	if code != 0 || strings.Count(out, ",up down,") != 3 {
		t.Fatalf("m2mctl report expiring -o csv: exit %d\n%s\n%s", code, out, errs)
	}
	code, out, errs = p.runCtl(t, ctl, work, "terminal", "get", "R2")
	if code != 0 || !regexp.MustCompile(`last seen +\S+ from 127\.0\.0\.1:\d+, MQTT 3\.1\.1, no session key`).MatchString(out) {
		t.Fatalf("m2mctl terminal get R2: exit %d\n%s\n%s", code, out, errs)
	}
	code, out, errs = p.runCtl(t, ctl, work, "terminal", "list")
	if code != 0 || !regexp.MustCompile(`(?m)^R1 .* never$`).MatchString(out) || regexp.MustCompile(`(?m)^R2 .* never$`).MatchString(out) {
		t.Fatalf("m2mctl terminal list: exit %d\n%s\n%s", code, out, errs)
	}
}

// readOnlyChanges are the admin API's changes, each of which a read-only
// operator's token must get 403 for.
var readOnlyChanges = []struct{ method, path, body string }{
	{"POST", "/v1/terminals", `{"sn":"X1","imei":"354494040518571","imsi":"460020084678121"}`},
	{"POST", "/v1/terminals/import", "sn,imei,imsi\nX2,354494040518572,460020084678122\n"},
	{"POST", "/v1/terminals/import?creds=true", "sn,imei,imsi\nX2,354494040518572,460020084678122\n"},
	{"DELETE", "/v1/terminals/S1", ""},
	{"POST", "/v1/terminals/S1/disable", ""},
	{"POST", "/v1/terminals/S1/enable", ""},
	{"POST", "/v1/terminals/S1/rekey", ""},
	{"POST", "/v1/terminals/S1/changes", `{"what":"all"}`},
	{"DELETE", "/v1/sessions/S1", ""},
	{"POST", "/v1/apps", `{"name":"dash"}`},
	{"DELETE", "/v1/apps/dash", ""},
}

// TestNamedOperatorsBinary: admin.tokens_file names a read-only and a full
// operator. The read-only token gets 403 on every change and changes
// nothing; the full operator disables a connected terminal, and both the
// admin API's audit line and the hook's session_ended event name it. No
// token is in the log. --check refuses a tokens file with a plain token.
func TestNamedOperatorsBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	bin := buildBinary(t)
	work := t.TempDir()
	const viewer, alice = "viewer-token-for-the-binary-0123456789", "alice-token-for-the-binary-0123456789"
	tokens := filepath.Join(work, "operators")
	os.WriteFile(tokens, []byte("# named operators\n"+adminapi.OperatorLine("viewer", adminapi.RoleRead, viewer)+"\n"+
		adminapi.OperatorLine("alice", adminapi.RoleFull, alice)+"\n"), 0o644)
	p := startBinary(t, bin, work, "--admin-tokens-file", tokens, "--log-format", "json")
	b := p.register(t, work, "S1")
	ctx := t.Context()
	for _, c := range readOnlyChanges {
		req, _ := http.NewRequest(c.method, p.admin+c.path, strings.NewReader(c.body))
		req.Header.Set("Authorization", "Bearer "+viewer)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body := new(bytes.Buffer)
		body.ReadFrom(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("viewer %s %s: %d %s, want 403", c.method, c.path, resp.StatusCode, body)
		}
	}
	viewerAPI, _ := adminapi.New(p.admin, viewer, nil)
	if op, err := viewerAPI.WhoAmI(ctx); err != nil || *op != (adminapi.Operator{Name: "viewer", Role: "read"}) {
		t.Fatalf("whoami: %+v %v", op, err)
	}
	if got, err := viewerAPI.GetTerminal(ctx, "S1"); err != nil || got.Status != "active" {
		t.Fatalf("the viewer reads S1: %+v %v (its attempts changed it?)", got, err)
	}
	if page, _ := viewerAPI.ListTerminals(ctx, "", 10); len(page.Terminals) != 1 {
		t.Fatalf("the viewer's attempts registered terminals: %+v", page.Terminals)
	}
	_, err := viewerAPI.DisableTerminal(ctx, "S1")
	if !errors.Is(err, adminapi.ErrForbidden) {
		t.Fatalf("viewer disable: %v, want ErrForbidden", err)
	}

	c := connectKept(t, p.mqtt, b)
	defer c.Disconnect(0)
	aliceAPI, _ := adminapi.New(p.admin, alice, nil)
	if _, err := aliceAPI.DisableTerminal(ctx, "S1"); err != nil {
		t.Fatal(err)
	}
	var audit, ended map[string]any
	testwait.For(t, 20*time.Second, "the audit line and the session_ended event", func() bool {
		for _, ev := range jsonLogLines(p.logs.String()) {
			switch {
			case ev["msg"] == "terminal disabled":
				audit = ev
			case ev["event"] == "session_ended" && ev["reason"] == "disabled":
				ended = ev
			}
		}
		return audit != nil && ended != nil
	})
	if audit["operator"] != "alice" || audit["sessions_ended"] != float64(1) {
		t.Errorf("audit line %v, want operator alice and one session ended", audit)
	}
	if ended["operator"] != "alice" || ended["sn"] != "S1" {
		t.Errorf("session_ended %v, want operator alice", ended)
	}
	p.terminate(t)
	for _, secret := range []string{viewer, alice} {
		if strings.Contains(p.logs.String(), secret) {
			t.Fatal("an operator's token is in the broker's log")
		}
	}
	for _, line := range []string{`"msg":"admin operator","name":"viewer","role":"read"`, `"msg":"admin operator","name":"alice","role":"full"`} {
		if !strings.Contains(p.logs.String(), line) {
			t.Errorf("the start-up log lacks %s", line)
		}
	}

	os.WriteFile(tokens, []byte("bob full the-token-itself-0123456789\n"), 0o600)
	out, err := exec.Command(bin, "--check", "--admin-tokens-file", tokens).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitConfig || !strings.Contains(string(out), "config key admin.tokens_file") ||
		strings.Contains(string(out), "the-token-itself") {
		t.Fatalf("--check with a plain token in the file: %v\n%s", err, out)
	}
}

func jsonLogLines(s string) []map[string]any {
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

// vaultCalls is a reverse proxy in front of Vault that counts the LISTs of
// the terminals path.
type vaultCalls struct {
	addr  string
	mu    sync.Mutex
	lists int
	gets  int
}

func startVaultCalls(t *testing.T, vaultAddr string) *vaultCalls {
	t.Helper()
	target, _ := url.Parse(vaultAddr)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	v := &vaultCalls{addr: "http://" + ln.Addr().String()}
	rp := httputil.NewSingleHostReverseProxy(target)
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/m2mguard/terminals") {
			v.mu.Lock()
			if r.Method == "LIST" || r.URL.Query().Get("list") == "true" {
				v.lists++
			} else if r.Method == http.MethodGet {
				v.gets++
			}
			v.mu.Unlock()
		}
		rp.ServeHTTP(w, r)
	})}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return v
}

func (v *vaultCalls) take() (lists, gets int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	lists, gets, v.lists, v.gets = v.lists, v.gets, 0, 0
	return
}

// TestVaultInventoryBinary: the broker on the real dev Vault. m2mctl
// terminal import --creds-out writes the generated secrets of the
// terminals stored, once, to a new 0600 CSV file (an existing file is
// refused) that a terminal logs in with; paging through the fleet LISTs
// the terminals path once, not once a page.
func TestVaultInventoryBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	v := vaulttest.Start(t)
	calls := startVaultCalls(t, v.Addr)
	bin := buildBinary(t)
	ctl := buildCtl(t, bin)
	work := t.TempDir()
	policy, err := os.ReadFile("../../deploy/vault/broker.hcl")
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(work, "vault.token")
	os.WriteFile(tokenFile, []byte(v.TokenWithPolicy(t, "m2mguard-broker", string(policy))), 0o600)
	p := startBinary(t, bin, work, "--store-type", "vault", "--store-vault-address", calls.addr, "--store-vault-token-file", tokenFile)

	const n = 250
	var in strings.Builder
	in.WriteString("sn,imei,imsi\n")
	for i := range n {
		fmt.Fprintf(&in, "V%04d,354494040518570,460020084678120\n", i)
	}
	in.WriteString("V0001,354494040518570,460020084678120\n") // a duplicate: rejected, no credentials
	csvFile := filepath.Join(work, "fleet.csv")
	os.WriteFile(csvFile, []byte(in.String()), 0o600)
	credsOut := filepath.Join(work, "creds.csv")
	m2mctl := func(args ...string) (int, string, string) { return p.runCtl(t, ctl, work, args...) }
	code, stdout, stderr := m2mctl("terminal", "import", csvFile, "--creds-out", credsOut)
	if code != ctlRejected || !strings.Contains(stdout, fmt.Sprintf("rows %d, created %d, rejected 1", n+1, n)) ||
		!strings.Contains(stderr, fmt.Sprintf("credentials of %d terminals written to %s (mode 0600)", n, credsOut)) {
		t.Fatalf("import: exit %d\n%s\n%s", code, stdout, stderr)
	}
	fi, err := os.Stat(credsOut)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s: %v %v, want mode 0600", credsOut, fi, err)
	}
	f, _ := os.Open(credsOut)
	rows, err := csv.NewReader(f).ReadAll()
	f.Close()
	if err != nil || len(rows) != n+1 || strings.Join(rows[0], ",") != "sn,imei,imsi,msisdn,alg,require_encryption,up,upexp,down,downexp,bk,bkexp,broker_url" {
		t.Fatalf("creds file: %d rows, header %v, %v", len(rows), rows[0], err)
	}
	for _, secret := range []string{rows[1][6], rows[1][8], rows[1][10]} {
		if strings.Contains(stdout+stderr, secret) || strings.Contains(p.logs.String(), secret) {
			t.Fatal("a secret of the import is on m2mctl's output or in the broker's log")
		}
	}
	// The file is what a factory writes into a device: V0000 logs in with it.
	row := rows[1]
	upexp, _ := strconv.ParseUint(row[7], 10, 32)
	dev := adminapi.Bundle{SN: row[0], IMEI: row[1], IMSI: row[2], Alg: row[4], Up: row[6], UpExp: uint32(upexp), BK: row[10]}
	if code := connect(t, p.mqtt, dev.SN, dev.IMEI+":"+dev.IMSI, loginToken(t, dev)); code != 0 {
		t.Fatalf("login with the credentials of the file: %d", code)
	}
	code, _, stderr = m2mctl("terminal", "import", csvFile, "--creds-out", credsOut)
	if code != ctlUsage || !strings.Contains(stderr, "file exists") {
		t.Fatalf("import onto an existing creds file: exit %d %s", code, stderr)
	}

	// Paging: the walk LISTs the terminals path once for every 10 s it
	// takes (the listing's TTL), not once a page.
	calls.take()
	api := adminClient(t, p.admin, work)
	pages, seen := 0, 0
	for after := ""; ; pages++ {
		page, err := api.ListTerminals(t.Context(), after, 25)
		if err != nil {
			t.Fatal(err)
		}
		seen += len(page.Terminals)
		if page.Next == "" {
			pages++
			break
		}
		after = page.Next
	}
	lists, gets := calls.take()
	if seen != n || lists > pages/2 || gets != n {
		t.Fatalf("%d terminals in %d pages: %d LISTs of the terminals path, %d GETs; want one LIST for every 10 s of the walk (not one a page) and a GET each", seen, pages, lists, gets)
	}
	t.Logf("%d pages: %d LISTs of the terminals path, %d GETs", pages, lists, gets)
	p.terminate(t)
}

package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

// importFleet registers the terminals of csv through the admin API.
func importFleet(t *testing.T, api *adminapi.Client, csv []byte, n int) {
	t.Helper()
	rep, err := api.ImportTerminals(context.Background(), bytes.NewReader(csv), nil)
	if err != nil || rep.Created != n {
		t.Fatalf("import: %v, %+v", err, rep)
	}
}

// campaignOf polls the campaign.
func campaignOf(t *testing.T, api *adminapi.Client, id string) *adminapi.Campaign {
	t.Helper()
	c, err := api.Campaign(context.Background(), id)
	if err != nil {
		t.Fatalf("campaign %s: %v", id, err)
	}
	return c
}

// TestCampaignOverFleetBinary is the judged run of a fleet-wide change
// against the broker binary: 1,000 terminals imported in bulk, 990 of them
// online (raw MQTT terminals that apply a cfg, acknowledge it and take the
// new values at done), 10 offline. A campaign of every terminal, --what
// pwd at the high rate (100 per second), commits the 990 and reports the
// 10 as waiting, by serial number, through the API, the CLI and /metrics;
// no terminal gets a second change.
//
//	M2MGUARD_CAMPAIGN_TERMINALS=5000 go test -run TestCampaignOverFleetBinary -v -timeout 20m ./cmd/m2mguard-broker
//
// runs it over more terminals (1% of them offline).
func TestCampaignOverFleetBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs 1,000 terminals")
	}
	t.Parallel()
	n := atoiEnv(t, "M2MGUARD_CAMPAIGN_TERMINALS", 1000)
	bin := buildBinary(t)
	ctl := buildCtl(t, bin)
	work := filepath.Join(t.TempDir(), "work")
	os.Mkdir(work, 0o755)
	p := startBinary(t, bin, work, "--mqtt-max-conns-per-addr", "100000")
	api := adminClient(t, p.admin, work)
	ctx := context.Background()

	terms, csv := rawTerminalCSV(t, "F", n)
	importFleet(t, api, csv, n)
	var online, offline []*rawTerminal
	for i, rt := range terms {
		if i%100 == 50 { // 1% offline, spread over the fleet
			offline = append(offline, rt)
		} else {
			online = append(online, rt)
		}
	}
	start := time.Now()
	goOnline(t, p.mqtt, online)
	t.Logf("%d terminals online in %v", len(online), time.Since(start).Round(time.Millisecond))

	start = time.Now()
	out, err := exec.Command(ctl, "--server", p.admin, "--token-file", filepath.Join(work, "data", "admin.token"), "-o", "json",
		"change", "campaign", "start", "--all", "--what", "pwd", "--rate", "high").CombinedOutput()
	if err != nil {
		t.Fatalf("m2mctl change campaign start: %v\n%s", err, out)
	}
	id := regexp.MustCompile(`"id": "([0-9a-f]{16})"`).FindSubmatch(out)
	if id == nil {
		t.Fatalf("no campaign id in %s", out)
	}
	camp := campaignOf(t, api, string(id[1]))
	testwait.For(t, 5*time.Minute, "the campaign did not handle the fleet", func() bool {
		camp = campaignOf(t, api, camp.ID)
		return camp.Handled == n && camp.Counts.Committed == len(online)
	})
	t.Logf("campaign over %d terminals: every one handled and %d committed in %v (rate %g per second)",
		n, camp.Counts.Committed, time.Since(start).Round(time.Millisecond), camp.Rate)
	// Outcomes are written every second: wait for the state to settle.
	testwait.For(t, 10*time.Second, "the campaign is not tracking its waiting changes", func() bool {
		camp = campaignOf(t, api, camp.ID)
		return camp.State == "tracking"
	})
	want := adminapi.Counts{Waiting: len(offline), Committed: len(online)}
	if camp.Counts != want {
		t.Fatalf("counts %+v, want %+v", camp.Counts, want)
	}

	// The offline terminals, by serial number: through the API and the CLI.
	var waiting []string
	for ct, err := range api.AllCampaignTerminals(ctx, camp.ID, "waiting") {
		if err != nil {
			t.Fatal(err)
		}
		if ct.RID == "" || ct.Deadline.IsZero() {
			t.Errorf("waiting terminal %s without its change: %+v", ct.SN, ct)
		}
		waiting = append(waiting, ct.SN)
	}
	if !slices.Equal(waiting, snsOf(offline)) {
		t.Fatalf("waiting terminals %v, want %v", waiting, snsOf(offline))
	}
	out, err = exec.Command(ctl, "--server", p.admin, "--token-file", filepath.Join(work, "data", "admin.token"),
		"change", "campaign", "status", camp.ID).CombinedOutput()
	if err != nil {
		t.Fatalf("m2mctl change campaign status: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "waiting: "+strings.Join(snsOf(offline), " ")) || !strings.Contains(string(out), "tracking") {
		t.Fatalf("m2mctl change campaign status does not report the waiting terminals:\n%s", out)
	}
	t.Logf("m2mctl change campaign status:\n%s", out)

	// Metrics: the campaign's terminals by outcome.
	m, err := api.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for outcome, want := range map[string]int{"committed": len(online), "waiting": len(offline), "busy": 0} {
		line := `m2mguard_campaign_terminals{campaign="` + camp.ID + `",outcome="` + outcome + `"} ` + strconv.Itoa(want)
		if !strings.Contains(string(m), line) {
			t.Errorf("/metrics lacks %s", line)
		}
	}

	// Every online terminal got exactly one change and committed it.
	for _, rt := range online {
		if c, d := rt.changes.Load(), rt.committed.Load(); c != 1 || d != 1 {
			t.Errorf("terminal %s: %d changes delivered, %d committed; want 1 and 1", rt.id.SN, c, d)
		}
	}
	if n := strings.Count(p.logs.String(), `msg="m2mguard change_started"`); n != len(terms) {
		t.Errorf("%d changes started, want %d", n, len(terms))
	}
	scanForSecrets(t, p.logs.String()+string(m), terms)
}

// scanForSecrets fails the test if a secret of terms (current or pending
// values, as text or hex) appears in text.
func scanForSecrets(t *testing.T, text string, terms []*rawTerminal) {
	t.Helper()
	const mark = "\x00LEAK\x00"
	var pairs []string
	for _, rt := range terms {
		for _, s := range rt.secrets() {
			pairs = append(pairs, string(s), mark, hexOf(s), mark)
		}
	}
	if n := strings.Count(strings.NewReplacer(pairs...).Replace(text), mark); n > 0 {
		t.Errorf("%d secrets appear in the broker's output", n)
	}
}

func hexOf(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&15])
	}
	return string(out)
}

// TestCampaignResumesAfterKillBinary kills the broker binary (SIGKILL:
// nothing flushed) in the middle of a campaign over online terminals and
// starts it again on the same data. The campaign resumes after its cursor
// and completes; no terminal gets a second change: each receives one rid,
// commits it, and the broker's logs of both runs hold one change_started
// per terminal. Terminals whose change had started when the broker died,
// but whose outcome was not written yet, are recognised from their record
// (the change pending, or committed since the intent) instead of counting
// as busy.
func TestCampaignResumesAfterKillBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	const n = 300
	bin := buildBinary(t)
	work := filepath.Join(t.TempDir(), "work")
	os.Mkdir(work, 0o755)
	p1 := startBinary(t, bin, work, "--mqtt-max-conns-per-addr", "100000")
	api := adminClient(t, p1.admin, work)
	ctx := context.Background()
	terms, csv := rawTerminalCSV(t, "R", n)
	importFleet(t, api, csv, n)
	f := goOnline(t, p1.mqtt, terms)

	camp, err := api.StartCampaign(ctx, adminapi.CampaignRequest{Select: "all", What: "all", Rate: 50})
	if err != nil {
		t.Fatal(err)
	}
	testwait.For(t, time.Minute, "the campaign did not get a third of the way", func() bool {
		return campaignOf(t, api, camp.ID).Handled >= n/3
	})
	p1.kill(t)
	before := p1.logs.String()
	startedBefore := startedPerSN(before)
	t.Logf("killed with %d changes started", len(startedBefore))

	p2 := startBinary(t, bin, work, "--mqtt-max-conns-per-addr", "100000")
	f.moveTo(p2.mqtt)
	api = adminClient(t, p2.admin, work)
	if !testwait.Until(2*time.Minute, func() bool {
		camp = campaignOf(t, api, camp.ID)
		return camp.Counts.Committed == n && camp.State == "done"
	}) {
		var open []string
		for ct, err := range api.AllCampaignTerminals(ctx, camp.ID, "") {
			if err == nil && ct.Outcome != "committed" {
				open = append(open, fmt.Sprintf("%+v\n%s\n%s", ct, grepLines(p1.logs.String(), "sn="+ct.SN+" "), grepLines(p2.logs.String(), "sn="+ct.SN+" ")))
			}
		}
		t.Fatalf("the resumed campaign did not commit every change: %+v\n%s", camp, strings.Join(open, "\n"))
	}
	if want := (adminapi.Counts{Committed: n}); camp.Counts != want || camp.Handled != n {
		t.Fatalf("counts %+v (handled %d), want %+v", camp.Counts, camp.Handled, want)
	}
	after := p2.logs.String()
	if !strings.Contains(after, "campaign resumed") {
		t.Fatal("the second run did not log that it resumed the campaign")
	}
	adopted := strings.Count(after, "the change pending is the campaign's") + strings.Count(after, "the change was committed before the restart")
	t.Logf("resumed; %d changes recognised from their record after the kill", adopted)

	started := startedPerSN(before + after)
	items := map[string]string{}
	for ct, err := range api.AllCampaignTerminals(ctx, camp.ID, "") {
		if err != nil {
			t.Fatal(err)
		}
		items[ct.SN] = ct.RID
	}
	for _, rt := range terms {
		sn := rt.id.SN
		// A change the kill caught between its store write and its log
		// line has no change_started line; the second run then finds it
		// in the terminal's record and logs that instead of starting one.
		lines := grepLines(after, "sn="+sn+" ")
		recognised := strings.Contains(lines, "the change pending is the campaign's") ||
			strings.Contains(lines, "the change was committed before the restart")
		if got := started[sn]; got != 1 && (got != 0 || !recognised) {
			t.Errorf("%s: %d changes started over both runs, want 1", sn, got)
		}
		if d := rt.distinctChanges(); d != 1 {
			t.Errorf("%s: %d different changes delivered, want 1", sn, d)
		}
		term, err := api.GetTerminal(ctx, sn)
		if err != nil {
			t.Fatal(err)
		}
		if term.Pending != nil || term.LastCommitted == "" || term.LastCommitted != items[sn] {
			t.Errorf("%s: last committed %q, pending %v; the campaign's change is %q", sn, term.LastCommitted, term.Pending != nil, items[sn])
		}
	}
	f.close()
	scanForSecrets(t, before+after, terms)
}

// startedPerSN counts the change_started events of a broker log by serial
// number.
func startedPerSN(logs string) map[string]int {
	out := map[string]int{}
	re := regexp.MustCompile(`msg="m2mguard change_started".* sn=([A-Za-z0-9]+) `)
	for _, m := range re.FindAllStringSubmatch(logs, -1) {
		out[m[1]]++
	}
	return out
}

// grepLines returns the lines of text that hold substr.
func grepLines(text, substr string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

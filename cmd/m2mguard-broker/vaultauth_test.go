package main

import (
	"bufio"
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/internal/freeport"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

// TestProductionVaultAuthAndSMSBinary runs the broker binary the way
// production does: logged in to Vault with AppRole and a response-wrapped
// secret_id written by the operator (the shipped broker policy), with an
// SMS gateway that first answers 429 Retry-After: 1. A credential change
// that must go by SMS waits that second and arrives once; /metrics shows
// the AppRole login, the token's time to live and the retry; every metric
// the shipped dashboard and alert rules use is exported once the broker has
// seen what they watch; no log line carries the wrapping token or the SMS
// text. Started again with the same
// wrapping token, the binary refuses to start and names the file.
func TestProductionVaultAuthAndSMSBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	v := vaulttest.Start(t)
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	gw.FailNextWith(1, http.StatusTooManyRequests)
	gw.RetryAfter("1")

	policy, err := os.ReadFile("../../deploy/vault/broker.hcl")
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	roleID, wrapped := v.WrappedAppRole(t, filepath.Join(work, "secrets"), "m2mguard-broker", string(policy))
	args := []string{"--store-type", "vault", "--store-vault-address", v.Addr,
		"--store-vault-approle-role-id-file", roleID, "--store-vault-approle-wrapping-token-file", wrapped,
		"--sms-url", gw.URL() + "/send", "--sms-backoff", "10ms", "--sms-max-backoff", "20ms"}
	bin := buildBinary(t)
	p := startBinary(t, bin, work, args...)
	if logs := p.logs.String(); !strings.Contains(logs, "auth=approle") || !strings.Contains(logs, "secret_id unwrapped") {
		t.Fatalf("the broker did not log in with the unwrapped secret_id:\n%s", logs)
	}

	// A change that must go by SMS: started while the terminal is away, it
	// logs in without its basic key's digest.
	ctx := t.Context()
	api := adminClient(t, p.admin, work)
	b, err := api.Register(ctx, adminapi.RegisterRequest{SN: "PROD1", IMEI: "354494040518570", IMSI: "460020084678120", MSISDN: "+8613800000009"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.StartChange(ctx, b.SN, "pwd"); err != nil {
		t.Fatal(err)
	}
	if code := connect(t, p.mqtt, b.SN, b.IMEI+":"+b.IMSI, loginToken(t, *b)); code != 0 {
		t.Fatalf("login: CONNACK %d", code)
	}
	testwait.For(t, 20*time.Second, "the SMS sent", func() bool { return p.metric(t, work, `m2mguard_sms_sends_total{result="sent"}`) >= 1 })
	at, msgs := gw.Arrivals(), gw.Messages()
	if len(at) != 2 || len(msgs) != 1 || msgs[0].To != b.MSISDN {
		t.Fatalf("%d attempts, %d messages; want 2 and 1 to the terminal", len(at), len(msgs))
	}
	if gap := at[1].Sub(at[0]); gap < time.Second {
		t.Fatalf("retried %v after a 429 with Retry-After: 1", gap)
	}

	m, err := api.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for sample, want := range map[string]func(float64) bool{
		`m2mguard_vault_logins_total{method="approle",result="success"}`: func(v float64) bool { return v >= 1 },
		`m2mguard_vault_token_ttl_seconds`:                               func(v float64) bool { return v > 0 && v <= 3600 },
		`m2mguard_sms_retries_total`:                                     func(v float64) bool { return v == 1 },
	} {
		if got, ok := m.Value(sample); !ok || !want(got) {
			t.Errorf("/metrics: %s = %v (present %v)", sample, got, ok)
		}
	}
	dashboardMetricsExported(t, p, work, api)

	token, _ := os.ReadFile(wrapped)
	for _, secret := range []string{strings.TrimSpace(string(token)), msgs[0].Text, b.Up} {
		if strings.Contains(p.logs.String(), secret) {
			t.Fatal("the broker's log carries a secret (wrapping token, SMS text or password)")
		}
	}
	p.terminate(t)

	// The wrapping token is spent: a second start is refused, naming the file.
	again := startFailing(t, bin, work, args...)
	if !strings.Contains(again, "already unwrapped") || !strings.Contains(again, wrapped) {
		t.Fatalf("second start with the same wrapping token:\n%s", again)
	}
}

// startFailing runs bin in work with args and returns what it wrote,
// failing the test unless it exits with status 1 (a start failure) within
// a minute.
func startFailing(t *testing.T, bin, work string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"--mqtt-tcp", freeport.Addr(t), "--mqtt-ws", ""}, args...)...)
	cmd.Dir = work
	cmd.Env = append(os.Environ(), "M2MGUARD_ADMIN_LISTEN="+freeport.Addr(t))
	out, err := cmd.CombinedOutput()
	if cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 1 {
		t.Fatalf("want exit status 1, got %v:\n%s", err, out)
	}
	return string(out)
}

// TestKubernetesAuthBinary: the broker binary in a pod's place logs in to
// Vault through its Kubernetes auth method (the service account's JWT,
// checked by a TokenReview API the test serves), under the shipped broker
// policy, and a terminal registered through
// its admin API logs in over MQTT.
func TestKubernetesAuthBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	v := vaulttest.Start(t)
	sa := vaulttest.ServiceAccount{Namespace: "iot", Name: "m2mguard", UID: "0d8c4b9e-1f2a-4e6b-8c3d-5a7b9c1d3e5f"}
	tr := vaulttest.StartTokenReview(t)
	policy, err := os.ReadFile("../../deploy/vault/broker.hcl")
	if err != nil {
		t.Fatal(err)
	}
	v.EnableKubernetesAuth(t, tr, "m2mguard-broker", sa, "m2mguard-broker", string(policy), "1h", "24h")
	work := t.TempDir()
	jwt := filepath.Join(work, "token")
	if err := os.WriteFile(jwt, []byte(tr.Issue(t, sa)), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startBinary(t, buildBinary(t), work, "--store-type", "vault", "--store-vault-address", v.Addr,
		"--store-vault-kubernetes-role", "m2mguard-broker", "--store-vault-kubernetes-token-file", jwt)
	if !strings.Contains(p.logs.String(), "auth=kubernetes") || tr.Reviews() == 0 {
		t.Fatalf("no Kubernetes login (%d token reviews):\n%s", tr.Reviews(), p.logs)
	}
	if got := p.metric(t, work, `m2mguard_vault_logins_total{method="kubernetes",result="success"}`); got < 1 {
		t.Fatalf("vault logins{kubernetes,success} = %v", got)
	}
	b := p.register(t, work, "KUBE1")
	if code := connect(t, p.mqtt, b.SN, b.IMEI+":"+b.IMSI, loginToken(t, b)); code != 0 {
		t.Fatalf("login of a terminal stored through Kubernetes auth: CONNACK %d", code)
	}
}

// usedMetric matches the metric names deploy's dashboard and alert rules
// may name: ours and the Go and process collectors'.
var usedMetric = regexp.MustCompile(`\b(m2mguard_[a-z0-9_]+|process_[a-z0-9_]+|go_[a-z0-9_]+)\b`)

// dashboardMetricsExported gives the broker p the activity the shipped
// Grafana dashboard and Prometheus alert rules watch (a login with a
// session key and an envelope that does not open, a wrong password, a
// moved SIM, a replayed login; the change and SMS send of the caller),
// scrapes /metrics with the metrics token, as Prometheus does, and
// requires every metric name the two files mention to be there.
func dashboardMetricsExported(t *testing.T, p *process, work string, api *adminapi.Client) {
	t.Helper()
	terms, csv := rawTerminalCSV(t, "D", 1)
	importFleet(t, api, csv, 1)
	c, err := terms[0].login(p.mqtt)
	if err != nil {
		t.Fatalf("login with a session key: %v", err)
	}
	defer c.conn.Close()
	if err := c.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 4,
		TopicName: "m2m/" + terms[0].id.SN + "/up/temp", Payload: []byte("not an envelope")}); err != nil {
		t.Fatal(err)
	}
	d := p.register(t, work, "DASH2")
	wrong, moved := d, d
	wrong.Up = "wrong-password-0"
	moved.IMSI = "460020084678999"
	if code := connect(t, p.mqtt, wrong.SN, wrong.IMEI+":"+wrong.IMSI, loginToken(t, wrong)); code == 0 {
		t.Fatal("a wrong password got in")
	}
	if code := connect(t, p.mqtt, moved.SN, moved.IMEI+":"+moved.IMSI, loginToken(t, moved)); code == 0 {
		t.Fatal("a moved SIM got in")
	}
	captured := loginToken(t, d)
	if code := connect(t, p.mqtt, d.SN, d.IMEI+":"+d.IMSI, captured); code != 0 {
		t.Fatalf("login: CONNACK %d", code)
	}
	if code := connect(t, p.mqtt, d.SN, d.IMEI+":"+d.IMSI, captured); code == 0 {
		t.Fatal("a replayed login got in")
	}

	var used []string
	for _, f := range []string{"../../deploy/grafana/m2mguard.json", "../../deploy/prometheus/alerts.yml"} {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		used = append(used, usedMetric.FindAllString(string(data), -1)...)
	}
	slices.Sort(used)
	used = slices.Compact(used)
	token, err := os.ReadFile(filepath.Join(work, "data", "metrics.token"))
	if err != nil {
		t.Fatal(err)
	}
	var missing []string
	testwait.Until(20*time.Second, func() bool { // the envelope failure is counted asynchronously
		names := scrapeNames(t, p.admin, strings.TrimSpace(string(token)))
		missing = missing[:0]
		for _, name := range used {
			if !names[name] {
				missing = append(missing, name)
			}
		}
		return len(missing) == 0
	})
	if len(missing) > 0 {
		t.Fatalf("the dashboard and alert rules use metrics the broker binary does not export: %v", missing)
	}
	t.Logf("%d metric names used by the dashboard and alert rules, all exported by the binary", len(used))
}

// scrapeNames reads base's /metrics with token and returns the names of
// every series (a histogram's as _bucket, _sum and _count).
func scrapeNames(t *testing.T, base, token string) map[string]bool {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, base+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics with the metrics token: HTTP %d", resp.StatusCode)
	}
	names := map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		if i := strings.IndexAny(line, "{ "); i > 0 {
			names[line[:i]] = true
		}
	}
	return names
}

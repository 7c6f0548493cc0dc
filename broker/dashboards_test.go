package broker_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"go.yaml.in/yaml/v3"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

const (
	alertsFile    = "../deploy/prometheus/alerts.yml"
	alertsTest    = "../deploy/prometheus/alerts_test.yml"
	dashboardFile = "../deploy/grafana/m2mguard.json"
)

// ruleFile is what Prometheus needs of a rules file; decoding it strictly
// refuses unknown fields.
type ruleFile struct {
	Groups []struct {
		Name     string `yaml:"name"`
		Interval string `yaml:"interval"`
		Rules    []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

// promDuration is Prometheus's duration syntax (5m, 1h30m, 2d).
var promDuration = regexp.MustCompile(`^([0-9]+(ms|s|m|h|d|w|y))+$`)

// TestAlertRules: deploy/prometheus/alerts.yml is valid YAML with the
// fields Prometheus needs (every alert named once, an expression, a
// Prometheus duration in for, a severity, a summary and a description),
// passes `promtool check rules`, and its unit tests (alerts_test.yml) pass
// `promtool test rules`. Without promtool the promtool parts skip, except
// under CI=true (.ci/run installs it: Debian package prometheus).
func TestAlertRules(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&rf); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	names := map[string]bool{}
	for _, g := range rf.Groups {
		if g.Name == "" || len(g.Rules) == 0 {
			t.Errorf("group %q: want a name and rules", g.Name)
		}
		for _, r := range g.Rules {
			switch {
			case r.Alert == "" || r.Record != "":
				t.Errorf("rule %q%q: want an alerting rule", r.Alert, r.Record)
			case names[r.Alert]:
				t.Errorf("alert %s twice", r.Alert)
			case strings.TrimSpace(r.Expr) == "":
				t.Errorf("alert %s: no expr", r.Alert)
			case r.For != "" && !promDuration.MatchString(r.For):
				t.Errorf("alert %s: for %q is no Prometheus duration", r.Alert, r.For)
			case r.Labels["severity"] != "critical" && r.Labels["severity"] != "warning" && r.Labels["severity"] != "info":
				t.Errorf("alert %s: severity %q, want critical, warning or info", r.Alert, r.Labels["severity"])
			case r.Annotations["summary"] == "" || r.Annotations["description"] == "":
				t.Errorf("alert %s: want a summary and a description", r.Alert)
			}
			names[r.Alert] = true
		}
	}
	if len(names) < 10 {
		t.Fatalf("%d alerts, want the full set", len(names))
	}

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("promtool not found (CI=true: .ci/run installs the Debian package prometheus)")
		}
		t.Skip("promtool not found: the promtool checks skip (apt-get install prometheus to run them)")
	}
	for _, args := range [][]string{{"check", "rules", alertsFile}, {"test", "rules", alertsTest}} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// TestDashboardsAndAlertsUseLiveMetrics starts a broker on a real Vault
// (AppRole with a wrapped secret_id, the shipped broker policy) with an SMS
// gateway, gives it the activity the dashboards and alerts watch (a login
// with a session key and a bad envelope, a wrong password, a replayed
// login, a moved SIM, a credential change), scrapes /metrics with the
// metrics token and requires every metric name that alerts.yml and the
// Grafana dashboard use to be there.
func TestDashboardsAndAlertsUseLiveMetrics(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()

	cfg := testConfig(t)
	cfg.Store.Type = "vault"
	cfg.Store.Vault.Address = v.Addr
	cfg.Store.Vault.AppRoleRoleIDFile, cfg.Store.Vault.AppRoleWrappingTokenFile = operatorAppRole(t, v, filepath.Join(t.TempDir(), "secrets"))
	cfg.SMS.URL = gw.URL() + "/send"
	b, logs := start(t, cfg)
	if !strings.Contains(logs.String(), "auth=approle") || !strings.Contains(logs.String(), "secret_id unwrapped") {
		t.Fatalf("the broker did not log in with the unwrapped secret_id:\n%s", logs)
	}

	ctx := t.Context()
	tm, err := b.Service().Register(ctx, keysvc.RegisterRequest{SN: "DASH1", IMEI: "354494040518570", IMSI: "460020084678120", MSISDN: "+8613800000001"})
	if err != nil {
		t.Fatal(err)
	}
	addr := b.Addr("tcp")
	// A login with a session key, then an envelope that does not open.
	conn, code := dialConnect(t, addr, connectBytes(t, tm, tm.Creds.Up, tm.IMSI, true))
	if code != 0 {
		t.Fatalf("login with a session key: CONNACK %d", code)
	}
	publishRaw(t, conn, "m2m/DASH1/up/temp", []byte("not an envelope"))
	// The bad envelope is counted once the broker has read it: wait for
	// that before the replayed login below takes this session over (and
	// closes it, maybe before its PUBLISH was read).
	testwait.For(t, 10*time.Second, "m2mguard_envelope_failures_total exported", func() bool {
		return scrapeNames(t, b, cfg)["m2mguard_envelope_failures_total"]
	})
	// A wrong password; a moved SIM; a replayed login.
	if _, code := dialConnect(t, addr, connectBytes(t, tm, []byte("wrong-password-0"), tm.IMSI, false)); code == 0 {
		t.Fatal("a wrong password got in")
	}
	if _, code := dialConnect(t, addr, connectBytes(t, tm, tm.Creds.Up, "460020084678999", false)); code == 0 {
		t.Fatal("a moved SIM got in")
	}
	captured := connectBytes(t, tm, tm.Creds.Up, tm.IMSI, false)
	if c, code := dialConnect(t, addr, captured); code != 0 {
		t.Fatalf("login: CONNACK %d", code)
	} else {
		c.Close()
	}
	if _, code := dialConnect(t, addr, captured); code == 0 {
		t.Fatal("a replayed login got in")
	}
	// An operator's credential change.
	if _, err := b.Hook().StartChange(ctx, "DASH1", codec.WhatPwd); err != nil {
		t.Fatal(err)
	}

	scraped := scrapeNames(t, b, cfg)
	used := usedMetricNames(t)
	var missing []string
	for _, name := range used {
		if name != "up" && !scraped[name] { // up is Prometheus's own
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		t.Fatalf("the dashboards and alerts use metrics the broker does not export: %v", missing)
	}
	t.Logf("%d metric names used, all exported", len(used))
	conn.Close()
}

// operatorAppRole sets up the broker's AppRole with the shipped broker
// policy, as README "Vault layout and policies" says, and returns the
// role_id file and the wrapped secret_id file.
func operatorAppRole(t *testing.T, v *vaulttest.Server, dir string) (roleIDFile, wrappedFile string) {
	t.Helper()
	policy, err := os.ReadFile("../deploy/vault/broker.hcl")
	if err != nil {
		t.Fatal(err)
	}
	return v.WrappedAppRole(t, dir, "m2mguard-broker", string(policy))
}

// connectBytes is a terminal's MQTT 3.1.1 CONNECT with a fresh login token
// signed with up, for the IMSI given (another than the record's is a moved
// SIM); withKey asks for a session key.
func connectBytes(t *testing.T, tm *keysvc.Terminal, up []byte, imsi string, withKey bool) []byte {
	t.Helper()
	var nonce [8]byte
	rand.Read(nonce[:])
	id := tm.Identity()
	id.IMSI = imsi
	l := codec.Login{Identity: id, Alg: tm.Alg, TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(nonce[:]))}
	if withKey {
		l.Flags, l.BKD = codec.FlagSessionKey, codec.BasicKeyDigest(tm.Alg, tm.Creds.BK, tm.Creds.BKExp)
	}
	pw, err := l.Sign(up)
	if err != nil {
		t.Fatal(err)
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 600, ClientIdentifier: tm.SN,
			UsernameFlag: true, Username: []byte(id.Username()), PasswordFlag: true, Password: pw}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// dialConnect sends a CONNECT and returns the connection and the CONNACK's
// return code (or 0xff if the broker closed the connection without one).
func dialConnect(t *testing.T, addr string, connect []byte) (net.Conn, byte) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(connect); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, ack); err != nil {
		if errors.Is(err, io.EOF) {
			return c, 0xff
		}
		t.Fatalf("connack: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	if ack[0] != 0x20 {
		t.Fatalf("not a CONNACK: % x", ack)
	}
	return c, ack[3]
}

// publishRaw publishes payload at QoS 0 on an open connection.
func publishRaw(t *testing.T, c net.Conn, topic string, payload []byte) {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic, Payload: payload}
	var buf bytes.Buffer
	if err := pk.PublishEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
}

// scrapeNames reads /metrics with the metrics token, as Prometheus does,
// and returns the names of every series (histograms as _bucket, _sum,
// _count), polling until the envelope failure has been counted.
func scrapeNames(t *testing.T, b *broker.Broker, cfg *broker.Config) map[string]bool {
	t.Helper()
	token, err := os.ReadFile(cfg.Admin.MetricsTokenFile)
	if err != nil {
		t.Fatal(err)
	}
	var names map[string]bool
	testwait.Until(10*time.Second, func() bool {
		req, _ := http.NewRequest(http.MethodGet, "http://"+b.Addr("admin")+"/metrics", nil)
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		names = map[string]bool{}
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
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("/metrics with the metrics token: HTTP %d", resp.StatusCode)
		}
		return names["m2mguard_envelope_failures_total"]
	})
	return names
}

// metricName matches the metric names the files may use: ours, the Go and
// process collectors', and Prometheus's up.
var metricName = regexp.MustCompile(`\b(m2mguard_[a-z0-9_]+|process_[a-z0-9_]+|go_[a-z0-9_]+|up)\b`)

// usedMetricNames returns every metric name in the expressions of the
// alert rules and of the dashboard's panels and variables, sorted.
func usedMetricNames(t *testing.T) []string {
	t.Helper()
	var exprs []string
	data, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(data, &rf); err != nil {
		t.Fatal(err)
	}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			exprs = append(exprs, r.Expr)
		}
	}
	data, err = os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title, UID string
		Panels     []struct {
			ID         int
			Type       string
			Title      string
			Datasource any
			Targets    []struct{ Expr string }
		}
		Templating struct {
			List []struct{ Definition string }
		}
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if dash.Title == "" || dash.UID == "" {
		t.Fatal("dashboard without title or uid")
	}
	ids := map[int]bool{}
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d twice", p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || len(p.Targets) == 0 {
			t.Errorf("panel %q: want a datasource and targets", p.Title)
		}
		for _, tg := range p.Targets {
			if tg.Expr == "" {
				t.Errorf("panel %q: a target without expr", p.Title)
			}
			exprs = append(exprs, tg.Expr)
		}
	}
	for _, v := range dash.Templating.List {
		exprs = append(exprs, v.Definition)
	}
	set := map[string]bool{}
	for _, e := range exprs {
		// Label names such as job or instance never match: the pattern
		// wants a known prefix.
		for _, m := range metricName.FindAllString(e, -1) {
			set[m] = true
		}
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

// eventLog collects the events an application or a webhook receives.
type eventLog struct {
	mu     sync.Mutex
	events []events.Event
	raw    []string // payloads or bodies as received, for the secret scan
	topics []string // MQTT: the topic of each event
}

func (l *eventLog) add(topic string, payload []byte, evs ...events.Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.raw = append(l.raw, string(payload))
	l.events = append(l.events, evs...)
	if topic != "" {
		l.topics = append(l.topics, topic)
	}
}

// of returns the events of sn received so far, in order.
func (l *eventLog) of(sn string) []events.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []events.Event
	for _, e := range l.events {
		if e.SN == sn {
			out = append(out, e)
		}
	}
	return out
}

func (l *eventLog) all() ([]events.Event, string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.events), strings.Join(l.raw, "\n")
}

// kindsOf lists the kind (and reason, if any) of each event.
func kindsOf(evs []events.Event) []string {
	out := make([]string, len(evs))
	for i, e := range evs {
		out[i] = string(e.Kind)
		if e.Reason != "" {
			out[i] += ":" + e.Reason
		}
	}
	return out
}

// TestPresenceEventsToSubscribedAppBinary is the judged run of the
// presence and security events against the broker binary. An application
// added with `m2mctl app add --subscribe '$m2m/events/#'` subscribes to
// $m2m/events/+/# and sees a terminal's connect, a refused login (wrong
// password), a binding mismatch and its disconnect, then its next connect
// and a credential change (started, delivered, committed, and the
// disconnect that follows it), in that order, each on
// $m2m/events/<sn>/<kind> with schema version 1. An application with the
// default reach is refused that subscription (SUBACK 0x80); a terminal is
// refused it too. A login of an unknown serial number gives no event. A
// webhook that answers 503 to its first two POSTs receives the same events
// in the same order after the retries, with the configured auth header.
// Neither the events nor the broker's log carry a secret of the terminal
// (old or new values), the webhook's auth value or its URL's query.
func TestPresenceEventsToSubscribedAppBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	const (
		hookAuth  = "Bearer hook-secret-3f9a1c"
		hookQuery = "key=query-secret-77d2e0"
		failFirst = 2
	)
	var hooked eventLog
	var (
		hookMu      sync.Mutex
		posts       int
		badAuth     int
		badBodyPost int
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		hookMu.Lock()
		posts++
		n := posts
		if r.Header.Get("Authorization") != hookAuth || r.URL.RawQuery != hookQuery || r.Method != http.MethodPost {
			badAuth++
		}
		hookMu.Unlock()
		if n <= failFirst {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		var b events.Batch
		if err := json.Unmarshal(body, &b); err != nil || b.V != events.Version {
			hookMu.Lock()
			badBodyPost++
			hookMu.Unlock()
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		hooked.add("", body, b.Events...)
	}))
	defer srv.Close()

	bin := buildBinary(t)
	ctl := buildCtl(t, bin)
	work := filepath.Join(t.TempDir(), "work")
	os.Mkdir(work, 0o755)
	p := startBinary(t, bin, work,
		"--events-webhook-url", srv.URL+"/m2m-events?"+hookQuery,
		"--events-webhook-auth-header", "Authorization", "--events-webhook-auth-value", hookAuth)
	api := adminClient(t, p.admin, work)
	ctx := context.Background()
	terms, csv := rawTerminalCSV(t, "EV", 1)
	importFleet(t, api, csv, 1)
	rt := terms[0]
	sn := rt.id.SN
	oldSecrets := rt.secrets()

	// The watcher: granted the event topics through the CLI.
	const watcherPW = "watcher-password-0123"
	add := exec.Command(ctl, "--server", p.admin, "--token-file", filepath.Join(work, "data", "admin.token"),
		"app", "add", "watcher", "--subscribe", "$m2m/events/#")
	add.Env = append(os.Environ(), "M2MCTL_APP_PASSWORD="+watcherPW)
	if out, err := add.CombinedOutput(); err != nil || !strings.Contains(string(out), "$m2m/events/#") {
		t.Fatalf("m2mctl app add --subscribe: %v\n%s", err, out)
	}
	var seen eventLog
	watcher := connectApp(t, p.mqtt, "watcher-1", "watcher", watcherPW)
	tok := watcher.Subscribe("$m2m/events/+/#", 1, func(_ paho.Client, m paho.Message) {
		var e events.Event
		if err := json.Unmarshal(m.Payload(), &e); err != nil {
			t.Errorf("event on %s is not JSON: %v: %q", m.Topic(), err, m.Payload())
		}
		seen.add(m.Topic(), m.Payload(), e)
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("watcher subscribe: %v", tok.Error())
	}
	if q := tok.(*paho.SubscribeToken).Result()["$m2m/events/+/#"]; q != 1 {
		t.Fatalf("watcher's subscription to $m2m/events/+/# answered 0x%02x, want granted QoS 1", q)
	}

	// An application with the default reach: refused.
	plainPW := p.addApp(t, work, "plain")
	var plainGot eventLog
	plain := connectApp(t, p.mqtt, "plain-1", "plain", plainPW)
	for _, f := range []string{"$m2m/events/+/#", "$m2m/events/" + sn + "/connected", "$m2m/#"} {
		tok := plain.Subscribe(f, 1, func(_ paho.Client, m paho.Message) { plainGot.add(m.Topic(), m.Payload()) })
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("plain subscribe %s: %v", f, tok.Error())
		}
		if q := tok.(*paho.SubscribeToken).Result()[f]; q != packets.ErrUnspecifiedError.Code {
			t.Fatalf("an application without the event reach subscribed to %s: 0x%02x, want 0x80", f, q)
		}
	}

	wait := func(what string, n int) {
		t.Helper()
		testwait.For(t, 30*time.Second, what, func() bool { return len(seen.of(sn)) >= n })
	}

	// 1. The terminal logs in: connected. It may not subscribe to events.
	c, err := rt.login(p.mqtt)
	if err != nil {
		t.Fatal(err)
	}
	if pk, err := readSuback(c); err != nil || pk.ReasonCodes[0] > 2 {
		t.Fatalf("key topic SUBACK: %v %+v", err, pk)
	}
	c.id++
	if err := c.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 4,
		PacketID: c.id, Filters: packets.Subscriptions{{Filter: "$m2m/events/+/#", Qos: 1}}}); err != nil {
		t.Fatal(err)
	}
	if pk, err := readSuback(c); err != nil || pk.ReasonCodes[0] != packets.ErrUnspecifiedError.Code {
		t.Fatalf("a terminal's subscription to $m2m/events/+/#: %v, %+v; want SUBACK 0x80", err, pk)
	}
	rt.mu.Lock()
	cur := rt.cur
	rt.mu.Unlock()
	wait("no connected event", 1)

	// 2. A login with a wrong password, then one from another IMEI.
	bad := cur
	bad.up = randomPassword()
	if _, err := rt.loginWith(p.mqtt, bad); err == nil {
		t.Fatal("a wrong password was accepted")
	}
	wait("no login_refused event", 2)
	moved := &rawTerminal{id: rt.id, alg: rt.alg}
	moved.id.IMEI = "354494040518588"
	if _, err := moved.loginWith(p.mqtt, cur); err == nil {
		t.Fatal("a login from another IMEI was accepted")
	}
	wait("no binding_mismatch event", 4)

	// An unknown serial number: refused, no event.
	stranger := &rawTerminal{id: rt.id, alg: rt.alg}
	stranger.id.SN = "EVNOBODY"
	if _, err := stranger.loginWith(p.mqtt, cur); err == nil {
		t.Fatal("an unknown terminal was accepted")
	}

	// 3. The terminal disconnects.
	if err := c.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ProtocolVersion: 4}); err != nil {
		t.Fatal(err)
	}
	c.conn.Close()
	wait("no disconnected event", 5)

	// 4. It logs in again and applies a credential change; the broker ends
	// the session once the change is committed.
	if c, err = rt.login(p.mqtt); err != nil {
		t.Fatal(err)
	}
	go rt.serve(c)
	wait("no second connected event", 6)
	if _, err := api.StartChange(ctx, sn, "pwd"); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 30*time.Second, "the change was not committed", func() bool { return rt.committed.Load() == 1 })
	wait("no disconnected event after the change", 10)

	want := []string{"connected", "login_refused:bad-digest", "binding_mismatch:imei", "login_refused:binding-mismatch",
		"disconnected:client-disconnect",
		"connected", "change_started", "change_delivered", "change_committed:ack", "disconnected:credentials-changed"}
	got := seen.of(sn)
	if !slices.Equal(kindsOf(got), want) {
		t.Fatalf("the watcher saw %v, want %v", kindsOf(got), want)
	}
	all, payloads := seen.all()
	if len(all) != len(want) {
		t.Errorf("the watcher saw %d events, want %d (none for the unknown terminal): %v", len(all), len(want), kindsOf(all))
	}
	seen.mu.Lock()
	for i, e := range got {
		if e.V != events.Version || e.SN != sn || e.Time.IsZero() || seen.topics[i] != events.Topic(sn, e.Kind) {
			t.Errorf("event %d on %s: %+v", i, seen.topics[i], e)
		}
		if i > 0 && e.Time.Before(got[i-1].Time) {
			t.Errorf("event %d (%s) is older than the one before", i, e.Kind)
		}
	}
	seen.mu.Unlock()
	rid := got[6].RID
	if len(rid) != 16 || got[7].RID != rid || got[8].RID != rid || got[6].What != "pwd" || got[6].Origin != "operator" || got[6].Mode == "" {
		t.Errorf("change events: %+v %+v %+v", got[6], got[7], got[8])
	}

	// The webhook: the same events after its retries.
	testwait.For(t, 30*time.Second, "the webhook did not receive every event", func() bool { return len(hooked.of(sn)) >= len(want) })
	hookedAll, bodies := hooked.all()
	if !slices.Equal(kindsOf(hookedAll), want) {
		t.Fatalf("the webhook received %v, want %v", kindsOf(hookedAll), want)
	}
	for i := range hookedAll {
		if hookedAll[i] != got[i] {
			t.Errorf("webhook event %d %+v, MQTT event %+v", i, hookedAll[i], got[i])
		}
	}
	hookMu.Lock()
	t.Logf("webhook: %d POSTs (%d answered 503), %d events", posts, failFirst, len(hookedAll))
	if badAuth != 0 || badBodyPost != 0 || posts <= failFirst {
		t.Errorf("webhook: %d POSTs, %d without the auth header or query, %d not a batch of version 1", posts, badAuth, badBodyPost)
	}
	hookMu.Unlock()
	m, err := api.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{
		`m2mguard_webhook_retries_total 2`,
		`m2mguard_webhook_events_total{result="sent"} 10`,
		`m2mguard_webhook_events_total{result="failed"} 0`,
		`m2mguard_events_total{kind="connected",result="emitted"} 2`,
		`m2mguard_events_total{kind="login_refused",result="emitted"} 2`,
		`m2mguard_events_dropped_total{queue="queue"} 0`,
	} {
		if !strings.Contains(string(m), line) {
			t.Errorf("/metrics lacks %s", line)
		}
	}

	if _, got := plainGot.all(); got != "" {
		t.Errorf("the application without the event reach received %q", got)
	}
	logs := p.logs.String()
	secrets := append(oldSecrets, rt.secrets()...)
	secrets = append(secrets, []byte(hookAuth), []byte("query-secret-77d2e0"), []byte(watcherPW), []byte(plainPW))
	text := payloads + "\n" + bodies + "\n" + logs
	for _, s := range secrets {
		if strings.Contains(text, string(s)) || strings.Contains(text, hexOf(s)) {
			t.Errorf("a secret (%d bytes) appears in the events or the broker's log", len(s))
		}
	}
}

// readSuback reads c up to the next SUBACK, skipping what comes before it
// (the session key message).
func readSuback(c *rawConn) (packets.Packet, error) {
	for {
		pk, err := c.read(10 * time.Second)
		if err != nil || pk.FixedHeader.Type == packets.Suback {
			return pk, err
		}
	}
}

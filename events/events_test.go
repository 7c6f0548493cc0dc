package events_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

func TestEventJSON(t *testing.T) {
	at := time.Date(2026, 12, 1, 6, 0, 0, 123456789, time.FixedZone("CET", 3600))
	tests := []struct {
		name string
		e    events.Event
		want string
	}{
		{"connected", events.New(events.Connected, "A1", at),
			`{"v":1,"kind":"connected","sn":"A1","time":"2026-12-01T05:00:00.123Z"}`},
		{"disconnected", func() events.Event {
			e := events.New(events.Disconnected, "A1", at)
			e.Reason = "keepalive-timeout"
			return e
		}(), `{"v":1,"kind":"disconnected","sn":"A1","time":"2026-12-01T05:00:00.123Z","reason":"keepalive-timeout"}`},
		{"change_started", func() events.Event {
			e := events.New(events.ChangeStarted, "A1", at)
			e.RID, e.What, e.Mode, e.Origin = "00000000000000ff", "pwd", "cipher", "operator"
			return e
		}(), `{"v":1,"kind":"change_started","sn":"A1","time":"2026-12-01T05:00:00.123Z","rid":"00000000000000ff","what":"pwd","mode":"cipher","origin":"operator"}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := string(tc.e.Marshal()); got != tc.want {
				t.Fatalf("got  %s\nwant %s", got, tc.want)
			}
			var back events.Event
			if err := json.Unmarshal(tc.e.Marshal(), &back); err != nil || back != tc.e {
				t.Fatalf("round trip: %v, %+v", err, back)
			}
		})
	}
	for _, k := range events.Kinds() {
		if !k.Valid() {
			t.Errorf("%s is not valid", k)
		}
	}
	if events.Kind("password").Valid() {
		t.Error("an unknown kind is valid")
	}
}

func TestParseTopic(t *testing.T) {
	tests := []struct {
		topic    string
		sn, kind string
		ok       bool
	}{
		{"$m2m/events/A1/connected", "A1", "connected", true},
		{"$m2m/events/A1/anything", "A1", "anything", true}, // kinds of later versions
		{"$m2m/events/A1/connected/x", "", "", false},
		{"$m2m/events/A1", "", "", false},
		{"$m2m/events/A1/", "", "", false},
		{"$m2m/events//connected", "", "", false},
		{"$m2m/events/+/connected", "", "", false},
		{"$m2m/events/A1/#", "", "", false},
		{"$m2m/events/key", "", "", false}, // the key topic of a terminal called "events"
		{"$m2m/A1/key", "", "", false},
		{"m2m/events/A1/connected", "", "", false},
		{"$m2m/events/ABCDEFGHIJKLMNOPQ/connected", "", "", false}, // 17 characters
		{"$m2m/events/A-1/connected", "", "", false},
	}
	for _, tc := range tests {
		sn, kind, ok := events.ParseTopic(tc.topic)
		if sn != tc.sn || string(kind) != tc.kind || ok != tc.ok {
			t.Errorf("ParseTopic(%q) = %q, %q, %v; want %q, %q, %v", tc.topic, sn, kind, ok, tc.sn, tc.kind, tc.ok)
		}
	}
	if got := events.Topic("A1", events.LoginRefused); got != "$m2m/events/A1/login_refused" {
		t.Errorf("Topic: %s", got)
	}
	if !events.IsFilter("$m2m/events/+/#") || events.IsFilter("$m2m/#") || events.IsFilter("#") {
		t.Error("IsFilter")
	}
}

// FuzzParseTopic: ParseTopic never panics, and what it accepts is the
// topic Topic makes of its parts.
func FuzzParseTopic(f *testing.F) {
	for _, s := range []string{"$m2m/events/A1/connected", "$m2m/events/key", "$m2m/events/A1/x/y", "$m2m/events/+/#", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, topic string) {
		sn, kind, ok := events.ParseTopic(topic)
		if ok && events.Topic(sn, kind) != topic {
			t.Fatalf("%q parsed as %q, %q", topic, sn, kind)
		}
	})
}

// TestQueueDropsWhenFull: Emit never waits for a stuck handler; what does
// not fit is dropped and counted, what fits comes out in order.
func TestQueueDropsWhenFull(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	var got []string
	q := events.NewQueue(events.QueueOptions{Size: 4}, func(e events.Event) {
		<-release
		mu.Lock()
		got = append(got, e.SN)
		mu.Unlock()
	})
	defer q.Close()
	for i := range 20 { // the handler holds one, the queue 4, the rest is dropped
		q.Emit(events.New(events.Connected, fmt.Sprintf("T%d", i), time.Now()))
	}
	close(release)
	testwait.For(t, 10*time.Second, "the queued events were not handled", func() bool { return q.Stats().Emitted+q.Stats().Dropped == 20 })
	q.Close()
	st := q.Stats()
	if st.Dropped < 15 || st.Emitted < 4 || st.Emitted > 5 {
		t.Fatalf("stats %+v: want 4 or 5 handled, the rest dropped", st)
	}
	mu.Lock()
	defer mu.Unlock()
	// In order: T0, then increasing numbers (T13 may follow T3: the
	// handler may have taken T0 only after some events were dropped).
	var nums []int
	for _, sn := range got {
		n, err := strconv.Atoi(strings.TrimPrefix(sn, "T"))
		if err != nil {
			t.Fatalf("handled %q", sn)
		}
		nums = append(nums, n)
	}
	if !slices.IsSorted(nums) || nums[0] != 0 {
		t.Fatalf("handled out of order: %v", got)
	}
	q.Emit(events.New(events.Connected, "late", time.Now()))
	if q.Stats().Dropped != st.Dropped+1 {
		t.Fatal("an event after Close was not counted as dropped")
	}
}

// TestQueueCloseHandsOverWhatWaits: Close hands the queued events to the
// handlers before it returns.
func TestQueueCloseHandsOverWhatWaits(t *testing.T) {
	var n int
	q := events.NewQueue(events.QueueOptions{}, func(events.Event) { n++ })
	for range 100 {
		q.Emit(events.New(events.Connected, "A1", time.Now()))
	}
	q.Close()
	if n != 100 || q.Stats().Emitted != 100 {
		t.Fatalf("%d handled, stats %+v", n, q.Stats())
	}
}

// hookServer is a webhook receiver that answers the first fail POSTs with
// status, then 200, and keeps the batches.
type hookServer struct {
	*httptest.Server
	mu      sync.Mutex
	posts   int
	batches [][]events.Event
	headers []http.Header
}

func newHookServer(t *testing.T, fail, status int) *hookServer {
	s := &hookServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var b events.Batch
		err := json.NewDecoder(r.Body).Decode(&b)
		s.mu.Lock()
		defer s.mu.Unlock()
		s.posts++
		s.headers = append(s.headers, r.Header.Clone())
		if s.posts <= fail {
			w.WriteHeader(status)
			return
		}
		if err != nil || b.V != events.Version {
			t.Errorf("not a batch of version 1: %v", err)
		}
		s.batches = append(s.batches, b.Events)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *hookServer) received() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, b := range s.batches {
		for _, e := range b {
			out = append(out, e.SN)
		}
	}
	return out
}

// TestWebhookRetriesAndBatches: a receiver that answers 503 twice gets
// every event, in order, in batches of at most Batch, after two retries;
// the auth header goes with every POST; the log has no body, auth value
// or query.
func TestWebhookRetriesAndBatches(t *testing.T) {
	srv := newHookServer(t, 2, http.StatusServiceUnavailable)
	var logs bytes.Buffer
	w := &events.Webhook{URL: srv.URL + "/in?token=q-secret", AuthHeader: "Authorization", AuthValue: "Bearer a-secret",
		Batch: 3, Interval: 20 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var want []string
	for i := range 7 {
		sn := fmt.Sprintf("W%d", i)
		want = append(want, sn)
		w.Emit(events.New(events.Connected, sn, time.Now()))
	}
	testwait.For(t, 10*time.Second, "the webhook did not deliver every event", func() bool { return len(srv.received()) == len(want) })
	if got := srv.received(); !slices.Equal(got, want) {
		t.Fatalf("received %v, want %v", got, want)
	}
	srv.mu.Lock()
	for _, b := range srv.batches {
		if len(b) > 3 {
			t.Errorf("a batch of %d events, want at most 3", len(b))
		}
	}
	for _, h := range srv.headers {
		if h.Get("Authorization") != "Bearer a-secret" || h.Get("Content-Type") != "application/json" {
			t.Errorf("headers %v", h)
		}
	}
	srv.mu.Unlock()
	// The webhook counts a batch once its POST has returned: after the
	// server has it.
	testwait.For(t, 10*time.Second, "the webhook did not count every event sent", func() bool { return w.Stats().Sent == 7 })
	st := w.Stats()
	if st.Sent != 7 || st.Retries != 2 || st.Failed != 0 || st.Dropped != 0 {
		t.Fatalf("stats %+v", st)
	}
	if strings.Contains(logs.String(), "secret") || strings.Contains(logs.String(), "W0") {
		t.Fatalf("the log holds a secret or a body: %s", logs.String())
	}
}

// TestWebhookRefusedBatchIsDropped: a 4xx answer is not retried: the batch
// is dropped and counted, and the log names the status only.
func TestWebhookRefusedBatchIsDropped(t *testing.T) {
	srv := newHookServer(t, 1, http.StatusBadRequest)
	var logs bytes.Buffer
	w := &events.Webhook{URL: srv.URL + "/in?token=q-secret", Interval: 10 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	w.Emit(events.New(events.Connected, "R1", time.Now()))
	testwait.For(t, 10*time.Second, "the refused batch was not counted", func() bool { return w.Stats().Failed == 1 })
	w.Emit(events.New(events.Connected, "R2", time.Now()))
	testwait.For(t, 10*time.Second, "the next batch was not delivered", func() bool { return w.Stats().Sent == 1 })
	if st := w.Stats(); st.Retries != 0 || st.Posts != 2 {
		t.Fatalf("stats %+v", st)
	}
	if l := logs.String(); !strings.Contains(l, "answer=400") || strings.Contains(l, "q-secret") || strings.Contains(l, "R1") {
		t.Fatalf("log: %s", l)
	}
}

// TestWebhookQueueBoundedAndCloseUnblocks: with a receiver that never
// answers, Emit still never blocks (drops are counted) and Close returns.
func TestWebhookQueueBoundedAndCloseUnblocks(t *testing.T) {
	stuck := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-stuck:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(stuck)
	w := &events.Webhook{URL: srv.URL, Queue: 10, Batch: 1, Interval: time.Millisecond, Timeout: time.Minute,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	for range 1000 {
		w.Emit(events.New(events.Connected, "S1", time.Now()))
	}
	if st := w.Stats(); st.Dropped < 1000-10-2 {
		t.Fatalf("stats %+v: want the events beyond the queue dropped", st)
	}
	closed := make(chan struct{})
	go func() { w.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return while a POST hung")
	}
}

func TestWebhookURL(t *testing.T) {
	for _, u := range []string{"", "ftp://x/y", "http://", "localhost:8080/x"} {
		w := &events.Webhook{URL: u}
		if err := w.Start(); err != events.ErrWebhookURL {
			t.Errorf("%q: %v", u, err)
		}
		w.Close()
	}
}

// Example: events of the hook handed to an application's handler through
// a Queue (the broker adds MQTTPublisher(server.Publish) and a Webhook's
// Emit as handlers).
func Example() {
	q := events.NewQueue(events.QueueOptions{}, func(e events.Event) {
		fmt.Println(events.Topic(e.SN, e.Kind), string(e.Marshal()))
	})
	e := events.New(events.Disconnected, "A00MS8011390002S", time.Date(2026, 12, 1, 6, 0, 0, 0, time.UTC))
	e.Reason = "keepalive-timeout"
	q.Emit(e) // from the hook, which holds it as an events.Sink
	q.Close()
	// Output:
	// $m2m/events/A00MS8011390002S/disconnected {"v":1,"kind":"disconnected","sn":"A00MS8011390002S","time":"2026-12-01T06:00:00Z","reason":"keepalive-timeout"}
}

package sms_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m2mguard/m2mguard/internal/syncbuf"
	"github.com/m2mguard/m2mguard/sms"
	"github.com/m2mguard/m2mguard/sms/smsmetrics"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

// TestSMSRetryAfterHonoured: a gateway that answers 429 or 503 with a
// Retry-After header (delay-seconds or an HTTP date) gets its next attempt
// no sooner than it asked for, although the sender's own back-off is far
// shorter. Only lower bounds on the waits are asserted: a timer never
// fires early, however loaded the machine.
func TestSMSRetryAfterHonoured(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		code       int
		retryAfter func() string
		atLeast    time.Duration
	}{
		{"429 seconds", http.StatusTooManyRequests, func() string { return "1" }, time.Second},
		// An HTTP date has whole seconds: 2 s ahead is at least 1 s ahead.
		{"503 date", http.StatusServiceUnavailable, func() string { return time.Now().Add(2 * time.Second).UTC().Format(http.TimeFormat) }, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			gw, err := smstest.Start("127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer gw.Close()
			gw.FailNextWith(1, tc.code)
			gw.RetryAfter(tc.retryAfter())
			s := sms.HTTPSender{URL: gw.URL() + "/send", Retries: 2, Backoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
			if err := s.Send(t.Context(), "+8613800000001", "M2M1.acc.secret"); err != nil {
				t.Fatalf("send: %v", err)
			}
			at := gw.Arrivals()
			if len(at) != 2 || len(gw.Messages()) != 1 {
				t.Fatalf("%d attempts, %d messages; want 2 and 1", len(at), len(gw.Messages()))
			}
			gap := at[1].Sub(at[0])
			if gap < tc.atLeast {
				t.Fatalf("retried %v after the %d with Retry-After %q; want at least %v", gap, tc.code, tc.retryAfter(), tc.atLeast)
			}
			t.Logf("retried %v after the %d", gap.Round(time.Millisecond), tc.code)
		})
	}
}

// TestSMSRetryAfterBeyondWhatTheSendMayWait: a Retry-After longer than
// MaxRetryAfter, or ending after the caller's deadline, ends the send at
// once with a *StatusError that carries it (the hook retries the change
// later), instead of holding the send or failing with a bare deadline.
func TestSMSRetryAfterBeyondWhatTheSendMayWait(t *testing.T) {
	for _, tc := range []struct {
		name       string
		retryAfter string
		ctxTimeout time.Duration
	}{
		{"beyond MaxRetryAfter", "120", 0},
		{"beyond the deadline", "20", 10 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gw, err := smstest.Start("127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer gw.Close()
			gw.FailNextWith(1, http.StatusTooManyRequests)
			gw.RetryAfter(tc.retryAfter)
			ctx := t.Context()
			if tc.ctxTimeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.ctxTimeout)
				defer cancel()
			}
			s := sms.HTTPSender{URL: gw.URL() + "/send", Retries: 3, MaxRetryAfter: 30 * time.Second}
			err = s.Send(ctx, "+8613800000001", "M2M1.acc.secret")
			var se *sms.StatusError
			if !errors.As(err, &se) || se.Code != http.StatusTooManyRequests || se.RetryAfter < 19*time.Second {
				t.Fatalf("got %v, want the 429 with its Retry-After", err)
			}
			if gw.Sends() != 1 {
				t.Fatalf("%d attempts, want 1", gw.Sends())
			}
			t.Log(err)
		})
	}
}

// TestSMSBackoffJitterBounded: without Retry-After, the wait before retry n
// is random in [d/2, d] with d = base·2ⁿ capped at the limit: never above
// the limit, never below half of d, and not always the same.
func TestSMSBackoffJitterBounded(t *testing.T) {
	base, limit := 100*time.Millisecond, time.Second
	for n, d := range []time.Duration{100, 200, 400, 800, 1000, 1000} {
		d *= time.Millisecond
		lo, hi := time.Duration(1<<62), time.Duration(0)
		for range 10000 {
			w := sms.Backoff(base, limit, n)
			lo, hi = min(lo, w), max(hi, w)
		}
		if lo < d/2 || hi > d {
			t.Errorf("retry %d: waits in [%v, %v], want within [%v, %v]", n, lo, hi, d/2, d)
		}
		if hi-lo < d/4 {
			t.Errorf("retry %d: waits in [%v, %v]: hardly any jitter", n, lo, hi)
		}
	}
	if w := sms.Backoff(time.Second, 5*time.Second, 1000); w > 5*time.Second || w < 2500*time.Millisecond {
		t.Errorf("retry 1000: %v, want within the limit", w)
	}
}

// TestSMSRetriesAgainstGateway: a gateway failing four times without
// Retry-After gets four retries; each logged wait lies within its jitter
// bounds, and each gap between attempts is at least the wait's lower bound.
func TestSMSRetriesAgainstGateway(t *testing.T) {
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	gw.FailNext(4)
	logs := &syncbuf.Buffer{}
	s := sms.HTTPSender{URL: gw.URL() + "/send", Retries: 4, Backoff: 40 * time.Millisecond, MaxBackoff: 100 * time.Millisecond,
		Logger: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	if err := s.Send(t.Context(), "+8613800000001", "M2M1.acc.secret"); err != nil {
		t.Fatal(err)
	}
	var waits []time.Duration
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var rec struct {
			Attempt int
			Answer  string
			Wait    time.Duration
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatal(err)
		}
		if rec.Answer != "503" || rec.Attempt != len(waits)+1 {
			t.Fatalf("log line %s", line)
		}
		waits = append(waits, rec.Wait)
	}
	at := gw.Arrivals()
	if len(waits) != 4 || len(at) != 5 {
		t.Fatalf("%d waits logged, %d attempts; want 4 and 5", len(waits), len(at))
	}
	for i, d := range []time.Duration{40, 80, 100, 100} {
		d *= time.Millisecond
		if waits[i] < d/2 || waits[i] > d {
			t.Errorf("wait %d: %v, want within [%v, %v]", i, waits[i], d/2, d)
		}
		if gap := at[i+1].Sub(at[i]); gap < waits[i] {
			t.Errorf("attempt %d came %v after the one before, less than the wait %v", i+2, gap, waits[i])
		}
	}
}

// TestSMSMetrics: every send is counted by result, with its duration and
// retries; the results exist at 0 before the first send.
func TestSMSMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := smsmetrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(m.Sends(sms.ResultFailed)); got != 0 {
		t.Fatalf("failed before any send: %v", got)
	}
	if n, err := testutil.GatherAndCount(reg, "m2mguard_sms_sends_total"); err != nil || n != 3 {
		t.Fatalf("%d series of sends_total (%v), want 3 at 0", n, err)
	}
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	s := sms.HTTPSender{URL: gw.URL() + "/send", Retries: 1, Backoff: time.Millisecond, Observer: m}
	send := func() error { return s.Send(t.Context(), "+8613800000001", "M2M1.acc.secret") }
	send()                                      // sent
	gw.FailNext(1)                              //
	send()                                      // sent after a retry
	gw.FailNextWith(1, http.StatusUnauthorized) //
	send()                                      // rejected
	gw.FailNext(2)                              //
	send()                                      // failed after a retry
	for result, want := range map[string]float64{sms.ResultSent: 2, sms.ResultRejected: 1, sms.ResultFailed: 1} {
		if got := testutil.ToFloat64(m.Sends(result)); got != want {
			t.Errorf("sends{result=%q} = %v, want %v", result, got, want)
		}
	}
	if n, _ := testutil.GatherAndCount(reg, "m2mguard_sms_send_duration_seconds"); n != 1 {
		t.Errorf("duration histogram missing")
	}
	if got := testutil.ToFloat64(m.Retries()); got != 2 {
		t.Errorf("retries = %v, want 2", got)
	}
}

package broker

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestAcceptErrorLoggerRateLimited: out of descriptors, the guard reports
// an accept error up to once a second per listener; the broker logs a
// warning at most every interval, counting the errors it stands for.
func TestAcceptErrorLoggerRateLimited(t *testing.T) {
	var buf bytes.Buffer
	clock := time.Unix(1_000_000, 0)
	report := acceptErrorLogger(slog.New(slog.NewJSONHandler(&buf, nil)), 10*time.Second, func() time.Time { return clock })
	emfile := errors.New("accept4: too many open files")
	for _, step := range []time.Duration{0, time.Second, time.Second, 8 * time.Second, time.Second, 30 * time.Second} {
		clock = clock.Add(step)
		report(emfile, time.Second)
	}
	var got []float64
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var rec struct {
			Level  string
			Errors float64
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if rec.Level != "WARN" {
			t.Errorf("level %s, want WARN", rec.Level)
		}
		got = append(got, rec.Errors)
	}
	// At 0 s (1 error), at 10 s (the 3 since: 1 s, 2 s, 10 s), at 41 s (the 2 since).
	if want := []float64{1, 3, 2}; len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("warnings counting %v errors, want %v:\n%s", got, want, buf.String())
	}
}

package main

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/syncbuf"
)

// TestEmbedCarriesOneReading: the example logs a terminal in with the
// client library and an application with paho, carries one sealed reading
// to the application in plaintext, and logs all of it (mochi, hook,
// terminal, itself) in one format.
func TestEmbedCarriesOneReading(t *testing.T) {
	var logs syncbuf.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := run(ctx, "127.0.0.1:0", slog.New(slog.NewTextHandler(&logs, nil)), false); err != nil {
		t.Fatalf("%v\n%s", err, logs.String())
	}
	out := logs.String()
	for _, want := range []string{`msg="application received the plaintext" message="m2m/EMBED1/up/temp {\"t\":21.5}"`, "sealed=true", "event=login_accepted", `component=mqtt`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s:\n%s", want, out)
		}
	}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if !strings.HasPrefix(line, "time=") {
			t.Errorf("a line in another format: %q", line)
		}
	}
}

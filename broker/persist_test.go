package broker_test

import (
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/m2mguard/m2mguard/broker"
)

// TestSessionStoreKeyAndOff: the session store is created in data_dir;
// another master key does not open it (a start-up error naming the key);
// mqtt.persistence off creates no file.
func TestSessionStoreKeyAndOff(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	b, _ := start(t, cfg)
	b.Close()
	if fi, err := os.Stat(filepath.Join(cfg.DataDir, "sessions.db")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("sessions.db: %v %v", fi, err)
	}
	other := filepath.Join(t.TempDir(), "other.key")
	cfg.Store.Embedded.MasterKeyFile = other
	cfg.Store.Embedded.File = filepath.Join(t.TempDir(), "m2mguard.db")
	_, err := broker.Start(t.Context(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	var ce *broker.ConfigError
	if !errors.As(err, &ce) || ce.Key != "mqtt.persistence_file" || !strings.Contains(err.Error(), other) {
		t.Fatalf("start with another master key: %v, want an error on mqtt.persistence_file naming the key", err)
	}

	cfg = testConfig(t)
	cfg.MQTT.Persistence = "off"
	b, _ = start(t, cfg)
	b.Close()
	if _, err := os.Stat(filepath.Join(cfg.DataDir, "sessions.db")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("sessions.db with persistence off: %v", err)
	}
}

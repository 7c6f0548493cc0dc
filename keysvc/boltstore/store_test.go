package boltstore_test

import (
	"bytes"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/keysvc/storetest"
)

var testKey = bytes.Repeat([]byte{0x5a}, boltstore.MasterKeySize)

func openAt(t testing.TB, path string) *boltstore.Store {
	t.Helper()
	s, err := boltstore.Open(path, boltstore.Options{MasterKey: testKey, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConformance(t *testing.T) {
	t.Parallel()
	// Each subtest gets its own file; the hooks act on the subtest's store.
	current := map[*testing.T]*boltstore.Store{}
	open := func(t *testing.T) keysvc.Store {
		s := openAt(t, filepath.Join(t.TempDir(), "m2mguard.db"))
		current[t] = s
		return s
	}
	storetest.Run(t, open, storetest.Options{
		Reopen: func(t *testing.T) keysvc.Store {
			old := current[t]
			if err := old.Close(); err != nil {
				t.Fatal(err)
			}
			s := openAt(t, old.Path())
			current[t] = s
			return s
		},
		Stop: func(t *testing.T) {
			if err := current[t].Close(); err != nil {
				t.Fatal(err)
			}
		},
	})
}

func TestWrongMasterKey(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "db")
	s := openAt(t, path)
	if err := s.CreateTerminal(t.Context(), storetest.Terminal("A1")); err != nil {
		t.Fatal(err)
	}
	s.Close()
	other := bytes.Repeat([]byte{0x11}, boltstore.MasterKeySize)
	_, err := boltstore.Open(path, boltstore.Options{MasterKey: other})
	if !errors.Is(err, boltstore.ErrWrongKey) {
		t.Fatalf("open with another key: err = %v, want ErrWrongKey", err)
	}
	for _, k := range [][]byte{nil, testKey[:16]} {
		if _, err := boltstore.Open(path, boltstore.Options{MasterKey: k}); !errors.Is(err, keysvc.ErrInvalid) {
			t.Fatalf("open with a %d-byte key: err = %v, want ErrInvalid", len(k), err)
		}
	}
}

func TestEncryptedAtRest(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "db")
	s := openAt(t, path)
	rec := storetest.Terminal("PlainSN1")
	if err := s.CreateTerminal(t.Context(), rec); err != nil {
		t.Fatal(err)
	}
	s.Close()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range [][]byte{rec.Creds.Up, rec.Creds.Down, rec.Creds.BK, []byte(rec.IMEI)} {
		if bytes.Contains(raw, secret) {
			t.Fatal("a secret or identity field is in the file in clear")
		}
	}
}

func TestClosedIsUnavailable(t *testing.T) {
	s := openAt(t, filepath.Join(t.TempDir(), "db"))
	s.Close()
	ctx := t.Context()
	_, err := s.GetTerminal(ctx, "A1")
	if !errors.Is(err, keysvc.ErrUnavailable) {
		t.Fatalf("get on a closed store: %v", err)
	}
	if err := s.UpdateTerminal(ctx, storetest.Terminal("A1")); !errors.Is(err, keysvc.ErrUnavailable) {
		t.Fatalf("update on a closed store: %v", err)
	}
	if _, err := s.ListApps(ctx); !errors.Is(err, keysvc.ErrUnavailable) {
		t.Fatalf("list apps on a closed store: %v", err)
	}
}

func TestLoadOrCreateMasterKey(t *testing.T) {
	const env = "M2MGUARD_TEST_MASTER_KEY"
	dir := t.TempDir()
	file := filepath.Join(dir, "master.key")

	k1, err := boltstore.LoadOrCreateMasterKey(env, file)
	if err != nil {
		t.Fatal(err)
	}
	if len(k1) != boltstore.MasterKeySize {
		t.Fatalf("key of %d bytes", len(k1))
	}
	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %04o, want 0600", st.Mode().Perm())
	}
	k2, err := boltstore.LoadOrCreateMasterKey(env, file)
	if err != nil || !bytes.Equal(k1, k2) {
		t.Fatal("second load did not return the same key")
	}

	if err := os.Chmod(file, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := boltstore.LoadOrCreateMasterKey(env, file); err == nil || !strings.Contains(err.Error(), "mode") {
		t.Fatalf("world-readable key file: err = %v, want a refusal naming the mode", err)
	}

	for _, tc := range []struct {
		name, val string
		ok        bool
	}{
		{"std", base64.StdEncoding.EncodeToString(testKey), true},
		{"raw url", base64.RawURLEncoding.EncodeToString(testKey), true},
		{"short", base64.StdEncoding.EncodeToString(testKey[:31]), false},
		{"not base64", "!!!", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(env, tc.val)
			k, err := boltstore.LoadOrCreateMasterKey(env, file) // the env wins over the (bad) file
			if tc.ok != (err == nil) {
				t.Fatalf("err = %v, want ok=%v", err, tc.ok)
			}
			if tc.ok && !bytes.Equal(k, testKey) {
				t.Fatal("env key decoded wrongly")
			}
			if err != nil && strings.Contains(err.Error(), tc.val) {
				t.Fatal("error repeats the key material")
			}
		})
	}
}

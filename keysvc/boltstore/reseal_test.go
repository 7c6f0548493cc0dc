package boltstore_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/keysvc/storetest"
)

// openLogged opens path with reseal and returns the store (nil on error),
// the log and the error.
func openLogged(path, reseal string) (*boltstore.Store, string, error) {
	var log bytes.Buffer
	s, err := boltstore.Open(path, boltstore.Options{MasterKey: testKey, NoSync: true, Reseal: reseal,
		Logger: slog.New(slog.NewTextHandler(&log, nil))})
	return s, log.String(), err
}

// rolledBack returns a store file in which terminal A1 was disabled and then
// rolled back to its active record.
func rolledBack(t *testing.T) string {
	path := filepath.Join(t.TempDir(), "m2mguard.db")
	raw := rawFile(path)
	withStore(t, path, func(s *boltstore.Store) { create(t, s, "A1", "B1") })
	old := raw.get(t, "terminals", "A1")
	withStore(t, path, func(s *boltstore.Store) { disable(t, s, "A1") })
	raw.put(t, "terminals", "A1", old)
	return path
}

func TestReseal(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	path := rolledBack(t)

	_, _, err := openLogged(path, "")
	var te *boltstore.TamperError
	if !errors.As(err, &te) || len(te.ResealCode) != 16 || te.Path != path {
		t.Fatalf("open: %v, want a *TamperError with the path and a reseal code", err)
	}
	for _, want := range []string{"backup", te.ResealCode, "not the ones this store last wrote"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the error does not say %q: %v", want, err)
		}
	}
	code := te.ResealCode
	if _, _, again := openLogged(path, ""); !errors.As(again, &te) || te.ResealCode != code {
		t.Fatalf("the reseal code of the same file changed: %v", again)
	}

	// A wrong code accepts nothing.
	if _, _, err := openLogged(path, "0000000000000000"); !errors.As(err, &te) || !te.StaleReseal {
		t.Fatalf("open with a wrong code: %v, want a *TamperError saying the code is stale", err)
	}

	// The right code reseals, loudly, and the records are as they were found.
	s, log, err := openLogged(path, code)
	if err != nil {
		t.Fatalf("open with the reseal code: %v", err)
	}
	if !strings.Contains(log, "level=ERROR") || !strings.Contains(log, "RESEALED") {
		t.Errorf("the reseal is not logged at level ERROR: %s", log)
	}
	if tm, err := s.GetTerminal(ctx, "A1"); err != nil || tm.Status != keysvc.StatusActive {
		t.Fatalf("A1 after the reseal: %v, %v", tm, err)
	}
	if err := s.Verify(ctx); err != nil {
		t.Fatalf("verify after the reseal: %v", err)
	}
	s.Close()

	// Left in place, the code does nothing on a sound file (and says so)...
	s, log, err = openLogged(path, code)
	if err != nil || !strings.Contains(log, "nothing resealed") {
		t.Fatalf("open with a used code: %v; log %s", err, log)
	}
	s.Close()
	// ...and accepts no later tampering.
	raw := rawFile(path)
	old := raw.get(t, "terminals", "B1")
	withStore(t, path, func(s *boltstore.Store) { disable(t, s, "B1") })
	raw.put(t, "terminals", "B1", old)
	if _, _, err := openLogged(path, code); !errors.As(err, &te) || !te.StaleReseal {
		t.Fatalf("a later rollback with the old code still set: %v, want refused", err)
	}
}

// TestResealRefusesWrongKey: a file none of whose records opens under the
// master key is not resealed under it.
func TestResealRefusesWrongKey(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "m2mguard.db")
	other := bytes.Repeat([]byte{0x11}, boltstore.MasterKeySize)
	s, err := boltstore.Open(path, boltstore.Options{MasterKey: other, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	create(t, s, "A1")
	s.Close()
	raw := rawFile(path)
	raw.put(t, "meta", "keycheck", nil) // or Open would say ErrWrongKey at once
	_, _, err = openLogged(path, "")
	var te *boltstore.TamperError
	if !errors.As(err, &te) {
		t.Fatalf("open: %v", err)
	}
	if _, _, err := openLogged(path, te.ResealCode); !errors.Is(err, boltstore.ErrWrongKey) {
		t.Fatalf("reseal under another key: %v, want ErrWrongKey", err)
	}
}

// TestUpgradeFromFormat1: a store written before the integrity head opens,
// says so in the log, keeps every record, and is checked from then on.
func TestUpgradeFromFormat1(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "m2mguard.db")
	fixtureV1(t, path)
	s, log, err := openLogged(path, "")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(log, "level=WARN") || !strings.Contains(log, "before the integrity check") || !strings.Contains(log, "terminals=2 apps=1") {
		t.Errorf("upgrade log: %s", log)
	}
	a, b := storetest.Terminal("V1A"), storetest.Terminal("V1B")
	a.Updated = a.Updated.Add(time.Hour)
	b.Status = keysvc.StatusDisabled
	for _, want := range []*keysvc.Terminal{a, b} {
		got, err := s.GetTerminal(ctx, want.SN)
		if err != nil {
			t.Fatalf("%s after the upgrade: %v", want.SN, err)
		}
		if d := storetest.Diff(got, want); d != "" {
			t.Errorf("%s after the upgrade: %s", want.SN, d)
		}
		if want.SN == "V1A" && got.Version != 4 {
			t.Errorf("V1A version %d, want 4 (kept)", got.Version)
		}
	}
	if _, err := s.GetTerminal(ctx, "V1C"); !errors.Is(err, keysvc.ErrNotFound) {
		t.Errorf("deleted V1C: %v", err)
	}
	if app, err := s.GetApp(ctx, "app1"); err != nil || app.Subscribe[0] != "m2m/+/up/#" {
		t.Errorf("app1 after the upgrade: %v", err)
	}
	n := storetest.Terminal("NEW1")
	if err := s.CreateTerminal(ctx, n); err != nil || n.Version <= 4 {
		t.Fatalf("create after the upgrade: version %d, %v; want above 4", n.Version, err)
	}
	if err := s.Verify(ctx); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, log, err = openLogged(path, "")
	if err != nil || log != "" {
		t.Fatalf("second open: %v, log %q", err, log)
	}
	s.Close()
}

// TestHeadFollowsEveryWrite: after random creates, bulk creates, updates,
// stale updates, deletes and app writes (failing ones included), the head
// always matches a full recount, and the file reopens.
func TestHeadFollowsEveryWrite(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "m2mguard.db")
	s := openAt(t, path)
	defer func() { s.Close() }()
	rng := rand.New(rand.NewPCG(1, 2))
	sn := func() string { return fmt.Sprintf("R%02d", rng.IntN(30)) }
	for i := range 600 {
		switch rng.IntN(7) {
		case 0:
			s.CreateTerminal(ctx, storetest.Terminal(sn()))
		case 1:
			ts := []*keysvc.Terminal{storetest.Terminal(sn()), storetest.Terminal(sn()), nil}
			if _, err := s.CreateTerminals(ctx, ts); err != nil {
				t.Fatal(err)
			}
		case 2, 3:
			if tm, err := s.GetTerminal(ctx, sn()); err == nil {
				tm = tm.Clone()
				tm.Status = keysvc.StatusDisabled
				if rng.IntN(4) == 0 {
					tm.Version-- // a stale writer: ErrConflict, nothing written
				}
				s.UpdateTerminal(ctx, tm)
			}
		case 4:
			s.DeleteTerminal(ctx, sn())
		case 5:
			s.PutApp(ctx, &keysvc.App{Name: "app" + sn(), PasswordHash: "$x"})
		case 6:
			s.DeleteApp(ctx, "app"+sn())
		}
		if i%50 == 49 {
			if err := s.Verify(ctx); err != nil {
				t.Fatalf("after %d operations: %v", i+1, err)
			}
			s.Close()
			s = openAt(t, path)
		}
	}
}

// TestHeadConcurrentWriters: concurrent writers keep the head exact.
func TestHeadConcurrentWriters(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openAt(t, filepath.Join(t.TempDir(), "m2mguard.db"))
	defer s.Close()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 50 {
				sn := fmt.Sprintf("G%dT%02d", g, i%10)
				s.CreateTerminal(ctx, storetest.Terminal(sn))
				if tm, err := s.GetTerminal(ctx, sn); err == nil {
					s.UpdateTerminal(ctx, tm.Clone())
				}
				if i%7 == 0 {
					s.DeleteTerminal(ctx, sn)
				}
			}
		})
	}
	wg.Wait()
	if err := s.Verify(ctx); err != nil {
		t.Fatal(err)
	}
}

package replay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/testwait"
)

// clock is a settable test clock.
type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *clock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *clock) advance(d time.Duration) { c.ns.Add(int64(d)) }

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// guards returns a memory and a file guard on c.
func guards(t *testing.T, c *clock) map[string]*Guard {
	t.Helper()
	fg, err := Open(t.TempDir(), Options{Now: c.now, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fg.Close() })
	return map[string]*Guard{"memory": NewMemory(Options{Now: c.now}), "file": fg}
}

func TestClaimOnce(t *testing.T) {
	c := newClock()
	for name, g := range guards(t, c) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			until := c.now().Add(6 * time.Minute)
			steps := []struct {
				sn    string
				nonce uint64
				want  bool
			}{
				{"A00MS8011390002S", 1, true},
				{"A00MS8011390002S", 1, false}, // a replay
				{"A00MS8011390002S", 2, true},  // another nonce
				{"B1", 1, true},                // another terminal, same nonce
				{"B1", 1, false},
			}
			for i, s := range steps {
				if got, err := g.Claim(ctx, s.sn, s.nonce, until); err != nil || got != s.want {
					t.Fatalf("step %d: Claim(%s, %d) = %v, %v; want %v", i, s.sn, s.nonce, got, err, s.want)
				}
			}
			if g.Len() != 3 {
				t.Fatalf("Len %d, want 3", g.Len())
			}
		})
	}
}

func TestClaimExpires(t *testing.T) {
	c := newClock()
	for name, g := range guards(t, c) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			sn := "EXP" + name[:1]
			if ok, err := g.Claim(ctx, sn, 7, c.now().Add(time.Minute)); !ok || err != nil {
				t.Fatalf("first claim: %v %v", ok, err)
			}
			c.advance(59 * time.Second)
			if ok, _ := g.Claim(ctx, sn, 7, c.now().Add(time.Minute)); ok {
				t.Fatal("claimed again before until")
			}
			c.advance(2 * time.Second)
			if ok, err := g.Claim(ctx, sn, 7, c.now().Add(time.Minute)); !ok || err != nil {
				t.Fatalf("after until: %v %v, want a new claim", ok, err)
			}
		})
	}
}

func TestClaimErrors(t *testing.T) {
	c := newClock()
	for name, g := range guards(t, c) {
		t.Run(name, func(t *testing.T) {
			later := c.now().Add(time.Minute)
			cancelled, cancel := context.WithCancel(context.Background())
			cancel()
			for _, tc := range []struct {
				name  string
				ctx   context.Context
				sn    string
				until time.Time
				want  error
			}{
				{"empty sn", context.Background(), "", later, ErrInvalid},
				{"long sn", context.Background(), "A00MS8011390002SX", later, ErrInvalid},
				{"until now", context.Background(), "S1", c.now(), ErrInvalid},
				{"cancelled", cancelled, "S1", later, context.Canceled},
			} {
				if ok, err := g.Claim(tc.ctx, tc.sn, 1, tc.until); ok || !errors.Is(err, tc.want) {
					t.Errorf("%s: %v, %v; want %v", tc.name, ok, err, tc.want)
				}
			}
			g.Close()
			if ok, err := g.Claim(context.Background(), "S1", 1, later); ok || !errors.Is(err, ErrClosed) {
				t.Errorf("after Close: %v, %v", ok, err)
			}
			if err := g.Close(); err != nil {
				t.Errorf("second Close: %v", err)
			}
		})
	}
}

// TestClaimIsAtomic: many goroutines claim one pair at once; exactly one
// wins, in every round.
func TestClaimIsAtomic(t *testing.T) {
	c := newClock()
	for name, g := range guards(t, c) {
		t.Run(name, func(t *testing.T) {
			for round := range 200 {
				var wins atomic.Int32
				var wg sync.WaitGroup
				start := make(chan struct{})
				for range 8 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						<-start
						if ok, err := g.Claim(context.Background(), "RACE", uint64(round), c.now().Add(time.Minute)); err != nil {
							t.Error(err)
						} else if ok {
							wins.Add(1)
						}
					}()
				}
				close(start)
				wg.Wait()
				if wins.Load() != 1 {
					t.Fatalf("round %d: %d winners", round, wins.Load())
				}
			}
		})
	}
}

// TestClaimWrittenBeforeReturn: when Claim returns true, its record is in
// the file, readable by another process (no Close, no fsync needed).
func TestClaimWrittenBeforeReturn(t *testing.T) {
	c := newClock()
	dir := t.TempDir()
	g, err := Open(dir, Options{Now: c.now, Logger: quiet, SyncEvery: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	until := c.now().Add(6 * time.Minute)
	for i := range uint64(10) {
		if ok, err := g.Claim(context.Background(), "W1", i, until); !ok || err != nil {
			t.Fatal(ok, err)
		}
		got := readDir(t, dir)
		if len(got) != int(i)+1 || got[len(got)-1].nonce != i {
			t.Fatalf("after claim %d the files hold %d records", i, len(got))
		}
	}
}

type rec struct {
	sn    string
	nonce uint64
	until int64
}

// readDir parses every claims file in dir as a second process would.
func readDir(t *testing.T, dir string) []rec {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, filePrefix+"*"+fileSuffix))
	var out []rec
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		readRecords(bytes.NewReader(data), func(k key, until int64) {
			out = append(out, rec{string(k.sn[:k.n]), k.nonce, until})
		})
	}
	return out
}

// TestReopenKeepsClaims: a guard opened again on the same directory refuses
// every unexpired claim of the one before, and forgets the expired ones.
func TestReopenKeepsClaims(t *testing.T) {
	c := newClock()
	dir := t.TempDir()
	ctx := context.Background()
	g, err := Open(dir, Options{Now: c.now, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	for i := range uint64(100) {
		until := c.now().Add(time.Duration(i+1) * 10 * time.Second) // 10 s .. 1000 s: several windows
		if ok, err := g.Claim(ctx, "R1", i, until); !ok || err != nil {
			t.Fatal(ok, err)
		}
	}
	if _, err := Open(dir, Options{Now: c.now, Logger: quiet}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open while held: %v, want ErrLocked", err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	c.advance(500 * time.Second) // claims 0..49 have expired (until <= now)
	g, err = Open(dir, Options{Now: c.now, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	for i := range uint64(100) {
		ok, err := g.Claim(ctx, "R1", i, c.now().Add(time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if wantNew := i < 50; ok != wantNew {
			t.Fatalf("nonce %d after reopen: claimed=%v, want %v", i, ok, wantNew)
		}
	}
}

// TestTornAndCorruptRecordsSkipped: a torn record at the end of a file, a
// corrupt one in the middle and appends behind both: only the damaged
// records are lost.
func TestTornAndCorruptRecordsSkipped(t *testing.T) {
	c := newClock()
	dir := t.TempDir()
	ctx := context.Background()
	until := c.now().Add(time.Minute)
	g, err := Open(dir, Options{Now: c.now, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	for i := range uint64(3) {
		g.Claim(ctx, "T1", i, until)
	}
	g.Close()
	files, _ := filepath.Glob(filepath.Join(dir, filePrefix+"*"))
	if len(files) != 1 {
		t.Fatalf("%d files, want 1", len(files))
	}
	data, _ := os.ReadFile(files[0])
	data[recordSize+10] ^= 0xff // nonce 1: corrupt
	torn := encodeRecord(mustKey(t, "T1", 99), until.UnixNano())
	data = append(data, torn[:17]...) // a write cut short
	os.WriteFile(files[0], data, 0o600)

	g, err = Open(dir, Options{Now: c.now, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	g.Claim(ctx, "T1", 3, until) // appended behind the torn record
	g.Close()
	g, err = Open(dir, Options{Now: c.now, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	for i, want := range []bool{false, true, false, false, true} {
		nonce := uint64(i)
		if i == 4 {
			nonce = 99
		}
		if ok, err := g.Claim(ctx, "T1", nonce, until); err != nil || ok != want {
			t.Errorf("nonce %d: claimed=%v (%v), want %v", nonce, ok, err, want)
		}
	}
}

func mustKey(t *testing.T, sn string, nonce uint64) key {
	t.Helper()
	k, err := newKey(sn, nonce)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestExpiredWindowsDropped: once a window has passed, its claims leave
// memory and its file is removed, without a compaction.
func TestExpiredWindowsDropped(t *testing.T) {
	c := newClock()
	dir := t.TempDir()
	g, err := Open(dir, Options{Now: c.now, Logger: quiet, Window: time.Minute, SyncEvery: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	for i := range uint64(1000) {
		g.Claim(context.Background(), "X1", i, c.now().Add(30*time.Second))
	}
	if g.Len() != 1000 || len(readDir(t, dir)) != 1000 {
		t.Fatalf("Len %d, %d records on disk; want 1000", g.Len(), len(readDir(t, dir)))
	}
	c.advance(2 * time.Minute)
	testwait.For(t, 10*time.Second, "expired claims dropped and their file removed", func() bool {
		files, _ := filepath.Glob(filepath.Join(dir, filePrefix+"*"))
		return g.Len() == 0 && len(files) == 0
	})
	// A memory guard drops them at the next claim.
	m := NewMemory(Options{Now: c.now, Window: time.Minute})
	for i := range uint64(1000) {
		m.Claim(context.Background(), "X1", i, c.now().Add(30*time.Second))
	}
	c.advance(2 * time.Minute)
	m.Claim(context.Background(), "X1", 0, c.now().Add(30*time.Second))
	if m.Len() != 1 {
		t.Fatalf("memory guard holds %d claims, want 1", m.Len())
	}
}

// TestClaimFailsClosed: a claim that cannot be written is refused with an
// error, and the pair stays free (it was never accepted).
func TestClaimFailsClosed(t *testing.T) {
	c := newClock()
	dir := t.TempDir()
	g, err := Open(dir, Options{Now: c.now, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	until := c.now().Add(time.Minute)
	if ok, err := g.Claim(context.Background(), "F1", 1, until); !ok || err != nil {
		t.Fatal(ok, err)
	}
	// Break the open file: the next write fails.
	g.mu.Lock()
	for _, s := range g.disk.segs {
		s.f.Close()
	}
	g.mu.Unlock()
	if ok, err := g.Claim(context.Background(), "F1", 2, until); ok || err == nil {
		t.Fatalf("claim on a broken file: %v, %v; want an error", ok, err)
	}
	if g.Len() != 1 {
		t.Fatalf("Len %d after a failed claim, want 1", g.Len())
	}
}

func TestSegmentNames(t *testing.T) {
	for _, tc := range []struct {
		name string
		end  int64
		ok   bool
	}{
		{segmentName(1796000000), 1796000000, true},
		{"claims-0.log", 0, false},
		{"claims--5.log", 0, false},
		{"claims-12.tmp", 0, false},
		{"lock", 0, false},
		{"claims-1x.log", 0, false},
	} {
		if end, ok := parseSegmentName(tc.name); ok != tc.ok || (ok && end != tc.end) {
			t.Errorf("%q: %d %v", tc.name, end, ok)
		}
	}
}

func TestRecordRoundTrip(t *testing.T) {
	for _, sn := range []string{"A", "A00MS8011390002S", "S\x00X"} {
		k := mustKey(t, sn, 0xfedcba9876543210)
		b := encodeRecord(k, -5)
		got, until, ok := parseRecord(b[:])
		if !ok || got != k || until != -5 {
			t.Errorf("%q: %v %d %v", sn, got, until, ok)
		}
	}
}

func ExampleOpen() {
	dir, _ := os.MkdirTemp("", "replay")
	defer os.RemoveAll(dir)
	g, err := Open(dir, Options{Logger: quiet})
	if err != nil {
		panic(err)
	}
	defer g.Close()
	ctx := context.Background()
	until := time.Now().Add(10 * time.Minute) // ts + skew + a margin
	first, _ := g.Claim(ctx, "A00MS8011390002S", 0x0123456789abcdef, until)
	again, _ := g.Claim(ctx, "A00MS8011390002S", 0x0123456789abcdef, until)
	fmt.Println(first, again)
	// Output: true false
}

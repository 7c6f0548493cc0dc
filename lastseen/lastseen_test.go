package lastseen

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func entry(sec int64, remote string, proto byte, key bool) Entry {
	return Entry{At: time.Unix(sec, 0).UTC(), Remote: remote, Protocol: proto, SessionKey: key}
}

func open(t *testing.T, path string) *Table {
	t.Helper()
	tab, err := Open(path, Options{FlushInterval: time.Hour}) // tests flush by hand
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tab.Close() })
	return tab
}

func TestSeenGetForget(t *testing.T) {
	for _, tc := range []struct {
		name string
		tab  func(t *testing.T) *Table
	}{
		{"memory", func(*testing.T) *Table { return NewMemory() }},
		{"file", func(t *testing.T) *Table { return open(t, filepath.Join(t.TempDir(), "ls.db")) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tab := tc.tab(t)
			if _, ok := tab.Get("A1"); ok {
				t.Fatal("an entry before any login")
			}
			tab.Seen("A1", entry(100, "192.0.2.1:5000", 4, false))
			tab.Seen("A1", entry(200, "192.0.2.2:6000", 5, true))
			tab.Seen("B2", entry(150, "[2001:db8::1]:7000", 4, true))
			if got, ok := tab.Get("A1"); !ok || got != entry(200, "192.0.2.2:6000", 5, true) {
				t.Fatalf("A1: %+v %t", got, ok)
			}
			tab.Forget("A1")
			tab.Forget("nobody")
			if _, ok := tab.Get("A1"); ok {
				t.Fatal("A1 after Forget")
			}
			if got, ok := tab.Get("B2"); !ok || got.Remote != "[2001:db8::1]:7000" {
				t.Fatalf("B2: %+v %t", got, ok)
			}
			if n := tab.Stats().Entries; n < 1 || n > 2 { // a forgotten entry stays until flushed
				t.Fatalf("entries %d", n)
			}
		})
	}
}

// TestSurvivesReopen: what was flushed (at Close) is there after a
// reopen, forgotten entries are not, and the file is 0600.
func TestSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ls.db")
	tab, err := Open(path, Options{FlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		tab.Seen(fmt.Sprintf("T%d", i), entry(int64(1000+i), "10.0.0.1:1", 4, i%2 == 0))
	}
	if err := tab.Flush(); err != nil {
		t.Fatal(err)
	}
	tab.Forget("T5")
	tab.Seen("T7", entry(5000, "10.0.0.7:7", 5, true)) // after the flush: written by Close
	if st := tab.Stats(); st.Flushes != 1 || st.Flushed != 100 {
		t.Fatalf("stats %+v", st)
	}
	if err := tab.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tab.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file mode: %v %v", fi, err)
	}
	again := open(t, path)
	if n := again.Stats().Entries; n != 99 {
		t.Fatalf("%d entries after reopen, want 99", n)
	}
	if _, ok := again.Get("T5"); ok {
		t.Fatal("T5 was forgotten")
	}
	if got, _ := again.Get("T7"); got != entry(5000, "10.0.0.7:7", 5, true) {
		t.Fatalf("T7 %+v", got)
	}
	if got, _ := again.Get("T8"); got != entry(1008, "10.0.0.1:1", 4, true) {
		t.Fatalf("T8 %+v", got)
	}
}

// TestFlushWritesOnlyChanges: a flush writes the entries changed since the
// one before, each once however often it logged in.
func TestFlushWritesOnlyChanges(t *testing.T) {
	tab := open(t, filepath.Join(t.TempDir(), "ls.db"))
	for i := range 1000 {
		tab.Seen(fmt.Sprintf("T%d", i), entry(1, "a:1", 4, false))
	}
	tab.Flush()
	for range 50 {
		tab.Seen("T1", entry(2, "a:1", 4, false))
		tab.Seen("T2", entry(2, "a:1", 4, false))
	}
	tab.Flush()
	tab.Flush() // nothing changed: no transaction
	if st := tab.Stats(); st.Flushed != 1002 || st.Flushes != 2 {
		t.Fatalf("stats %+v, want 1002 entries written in 2 batches", st)
	}
}

// TestSkipsBadEntries: a value that does not decode is skipped at load.
func TestSkipsBadEntries(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ls.db")
	tab := open(t, path)
	tab.Seen("OK1", entry(7, "a:1", 4, false))
	tab.Close()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucket)
		b.Put([]byte("BAD1"), []byte{9, 9, 9})
		b.Put([]byte("bad/key"), encode(nil, entry(1, "a:1", 4, false)))
		return nil
	})
	db.Close()
	again := open(t, path)
	if n := again.Stats().Entries; n != 1 {
		t.Fatalf("%d entries, want 1", n)
	}
}

// TestSeenDoesNotAllocate: once a terminal has an entry, recording its
// login allocates nothing.
func TestSeenDoesNotAllocate(t *testing.T) {
	tab := NewMemory()
	e := entry(1, "192.0.2.1:5000", 4, true)
	sn := "A00MS8011390002S"
	tab.Seen(sn, e)
	if n := testing.AllocsPerRun(1000, func() { tab.Seen(sn, e) }); n != 0 {
		t.Fatalf("Seen allocates %.1f times per call", n)
	}
}

// TestConcurrent: logins, reads, forgets and flushes at once (run with -race).
func TestConcurrent(t *testing.T) {
	tab := open(t, filepath.Join(t.TempDir(), "ls.db"))
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 2000 {
				sn := fmt.Sprintf("G%dT%d", g, i%100)
				tab.Seen(sn, entry(int64(i), "a:1", 4, false))
				tab.Get(sn)
				if i%97 == 0 {
					tab.Forget(sn)
				}
			}
		})
	}
	wg.Go(func() {
		for range 20 {
			if err := tab.Flush(); err != nil {
				t.Error(err)
			}
		}
	})
	wg.Wait()
	if err := tab.Flush(); err != nil {
		t.Fatal(err)
	}
}

func TestEncodingRoundTrip(t *testing.T) {
	for _, e := range []Entry{
		entry(0, "", 0, false),
		entry(1_700_000_000, "192.0.2.1:5000", 4, true),
		entry(-5, string(bytes.Repeat([]byte("x"), maxRemote)), 5, false),
	} {
		got, err := decode(encode(nil, e))
		if err != nil || got != e {
			t.Errorf("%+v: got %+v %v", e, got, err)
		}
	}
	for name, v := range map[string][]byte{
		"empty":       nil,
		"short":       {1, 0, 0},
		"version":     append([]byte{2}, encode(nil, entry(1, "a", 4, false))[1:]...),
		"flags":       func() []byte { v := encode(nil, entry(1, "a", 4, false)); v[10] = 2; return v }(),
		"long remote": func() []byte { v := encode(nil, entry(1, "a", 4, false)); v[11] = 2; return v }(),
		"trailing":    append(encode(nil, entry(1, "a", 4, false)), 0),
	} {
		if _, err := decode(v); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
}

// FuzzDecode: decode never panics, and whatever it accepts encodes back to
// the same bytes.
func FuzzDecode(f *testing.F) {
	f.Add(encode(nil, entry(1_700_000_000, "192.0.2.1:5000", 4, true)))
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0})
	f.Fuzz(func(t *testing.T, v []byte) {
		e, err := decode(v)
		if err != nil {
			return
		}
		if again := encode(nil, e); !bytes.Equal(again, v) {
			t.Fatalf("%x decodes to %+v, which encodes to %x", v, e, again)
		}
	})
}

// BenchmarkSeen is the hook's cost per login: a terminal that has an
// entry logs in again (go test ./lastseen -bench Seen -benchmem).
func BenchmarkSeen(b *testing.B) {
	tab := NewMemory()
	sns := make([]string, 10_000)
	for i := range sns {
		sns[i] = fmt.Sprintf("T%08d", i)
		tab.Seen(sns[i], entry(1, "192.0.2.1:5000", 4, true))
	}
	e := entry(2, "192.0.2.1:5000", 4, true)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			tab.Seen(sns[i%len(sns)], e)
			i++
		}
	})
}

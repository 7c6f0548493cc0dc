package client

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/m2mguard/m2mguard/codec"
)

func TestFileStoreLifecycle(t *testing.T) {
	path := filepath.Join(t.TempDir(), "creds.json")
	fs := NewFileStore(path)
	if _, err := fs.Load(); !errors.Is(err, ErrNoCredentials) {
		t.Fatalf("missing file: %v", err)
	}
	rec := &Record{Identity: testID, Alg: codec.HS256, BrokerURL: "tcp://localhost:1883", Current: testCreds()}
	if err := fs.Save(rec); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v %v", st.Mode(), err)
	}
	p := Pending{RID: 0x1234, Params: newPwdParams, Mode: codec.ModeSMS}
	if err := fs.SavePending(p); err != nil {
		t.Fatal(err)
	}
	got, err := fs.Load()
	if err != nil {
		t.Fatal(err)
	}
	if got.Identity != testID || got.Alg != codec.HS256 || got.Pending == nil || got.Pending.RID != 0x1234 ||
		!bytes.Equal(got.Current.Up, testCreds().Up) || !bytes.Equal(got.Pending.Params.Up, newPwdParams.Up) {
		t.Fatalf("round trip: %+v", got)
	}
	if err := fs.Commit(0x9999); err != nil { // not pending: no-op
		t.Fatal(err)
	}
	if err := fs.Commit(0x1234); err != nil {
		t.Fatal(err)
	}
	got, _ = fs.Load()
	if got.Pending != nil || !bytes.Equal(got.Current.Up, newPwdParams.Up) || !bytes.Equal(got.Current.BK, testCreds().BK) {
		t.Fatalf("after commit: %+v", got.Pending)
	}
	if got.BrokerURL != "tcp://localhost:1883" {
		t.Fatalf("the broker URL did not survive a change: %q", got.BrokerURL)
	}
	if err := fs.SavePending(Pending{RID: 0x55, Params: newBKParams}); err != nil {
		t.Fatal(err)
	}
	if err := fs.Discard(0x55); err != nil {
		t.Fatal(err)
	}
	got, _ = fs.Load()
	if got.Pending != nil || !bytes.Equal(got.Current.BK, testCreds().BK) {
		t.Fatal("discard changed the current values")
	}
	st, _ = os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode after updates %v", st.Mode())
	}
	// No temporary file is left behind.
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Fatalf("directory holds %d files", len(ents))
	}
}

// A crash at any step of a write leaves the file as it was (old) or as
// intended (new), never torn; the terminal can always log in.
func TestFileStoreCrash(t *testing.T) {
	for _, step := range []string{"write", "rename"} {
		for _, op := range []string{"pending", "commit"} {
			t.Run(step+"/"+op, func(t *testing.T) {
				dir := t.TempDir()
				path := filepath.Join(dir, "creds.json")
				fs := NewFileStore(path)
				if err := fs.Save(&Record{Current: testCreds()}); err != nil {
					t.Fatal(err)
				}
				if op == "commit" {
					if err := fs.SavePending(Pending{RID: 1, Params: newPwdParams}); err != nil {
						t.Fatal(err)
					}
				}
				before, _ := os.ReadFile(path)
				crash := errors.New("power cut")
				fs.hook = func(s string) error {
					if s == step {
						return crash
					}
					return nil
				}
				var err error
				if op == "pending" {
					err = fs.SavePending(Pending{RID: 1, Params: newPwdParams})
				} else {
					err = fs.Commit(1)
				}
				if !errors.Is(err, crash) {
					t.Fatalf("got %v", err)
				}
				after, _ := os.ReadFile(path)
				if !bytes.Equal(before, after) {
					t.Fatal("file changed by a write that did not complete")
				}
				// A fresh store (the terminal after the reboot) loads it.
				rec, err := NewFileStore(path).Load()
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(rec.Current.Up, testCreds().Up) {
					t.Fatal("current values lost")
				}
				// The failed write's temporary file (a real crash would leave
				// it) does not disturb the store.
				fs.hook = nil
				if err := fs.Commit(1); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

func TestDecodeRecordRejects(t *testing.T) {
	good, err := EncodeRecord(&Record{Current: testCreds(), Pending: &Pending{RID: 3, Params: newBKParams}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DecodeRecord(good); err != nil {
		t.Fatal(err)
	}
	// A file written before the broker URL was stored still loads.
	if rec, err := DecodeRecord(good); err != nil || rec.BrokerURL != "" || bytes.Contains(good, []byte(`"broker"`)) {
		t.Fatalf("file without broker: %v", err)
	}
	for name, data := range map[string]string{
		"empty":          "",
		"not json":       "{",
		"version":        strings.Replace(string(good), `"version": 1`, `"version": 2`, 1),
		"unknown field":  strings.Replace(string(good), `"version": 1`, `"version": 1, "x": 1`, 1),
		"trailing":       string(good) + "{}",
		"bad rid":        strings.Replace(string(good), `"rid": "0000000000000003"`, `"rid": "3"`, 1),
		"bad what":       strings.Replace(string(good), `"what": "bk"`, `"what": "pin"`, 1),
		"no current":     `{"version":1,"current":{}}`,
		"bad broker":     strings.Replace(string(good), `"version": 1`, `"version": 1, "broker": "http://x:1"`, 1),
		"broker no host": strings.Replace(string(good), `"version": 1`, `"version": 1, "broker": "tcp://"`, 1),
	} {
		if _, err := DecodeRecord([]byte(data)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzDecodeRecord(f *testing.F) {
	good, _ := EncodeRecord(&Record{Identity: testID, Alg: codec.MD5, Current: testCreds(), Pending: &Pending{RID: 3, Params: newPwdParams}})
	f.Add(good)
	withURL, _ := EncodeRecord(&Record{Identity: testID, BrokerURL: "ssl://mqtt.example.com:8883", Current: testCreds()})
	f.Add(withURL)
	f.Add([]byte(`{"version":1,"current":{"up":"dmt3RjJTSmFRN21YYzRMcA==","down":"VW8zYUhDYkd6OFJ0WTJOdw=="}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		rec, err := DecodeRecord(data)
		if err != nil {
			return
		}
		// Whatever decodes is valid and survives a round trip.
		if err := rec.Current.Validate(); err != nil {
			t.Fatalf("decoded invalid credentials: %v", err)
		}
		enc, err := EncodeRecord(rec)
		if err != nil {
			t.Fatal(err)
		}
		back, err := DecodeRecord(enc)
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if !bytes.Equal(back.Current.Up, rec.Current.Up) || (back.Pending == nil) != (rec.Pending == nil) || back.BrokerURL != rec.BrokerURL {
			t.Fatal("round trip changed the record")
		}
	})
}

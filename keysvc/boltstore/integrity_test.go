package boltstore

import (
	"bytes"
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/m2mguard/m2mguard/keysvc"
)

var internalKey = bytes.Repeat([]byte{0x5a}, MasterKeySize)

func integrityKey(t testing.TB, master []byte) []byte {
	k, err := hkdf.Key(sha256.New, master, nil, integrityInfo, sha256.Size)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestElementMAC: the element of a record changes with every part of its
// input, the boundaries between the parts included, and with the key; it
// is deterministic; and the known answers (computed independently with
// Python's hmac and an RFC 5869 HKDF) pin the format: a change would make
// every existing store fail its check.
func TestElementMAC(t *testing.T) {
	kInt := integrityKey(t, internalKey)
	m := newMacer(kInt)
	base := m.element([]byte("terminals"), []byte("AB"), []byte{0, 0, 0, 0, 0, 0, 0, 1, 0xaa})
	for _, tc := range []struct {
		name               string
		bucket, key, value string
		kInt               []byte
	}{
		{"other bucket", "apps", "AB", "\x00\x00\x00\x00\x00\x00\x00\x01\xaa", nil},
		{"bucket/key boundary", "terminalsA", "B", "\x00\x00\x00\x00\x00\x00\x00\x01\xaa", nil},
		{"key/value boundary", "terminals", "ABx", "\x00\x00\x00\x00\x00\x00\x01\xaa", nil},
		{"other key", "terminals", "AC", "\x00\x00\x00\x00\x00\x00\x00\x01\xaa", nil},
		{"other version", "terminals", "AB", "\x00\x00\x00\x00\x00\x00\x00\x02\xaa", nil},
		{"other sealed bytes", "terminals", "AB", "\x00\x00\x00\x00\x00\x00\x00\x01\xab", nil},
		{"value cut", "terminals", "AB", "\x00\x00\x00\x00\x00\x00\x00\x01", nil},
		{"other master key", "terminals", "AB", "\x00\x00\x00\x00\x00\x00\x00\x01\xaa", integrityKey(t, bytes.Repeat([]byte{1}, MasterKeySize))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mm := m
			if tc.kInt != nil {
				mm = newMacer(tc.kInt)
			}
			if e := mm.element([]byte(tc.bucket), []byte(tc.key), []byte(tc.value)); e == base {
				t.Fatal("same element as the base record")
			}
		})
	}
	if again := newMacer(kInt).element([]byte("terminals"), []byte("AB"), []byte{0, 0, 0, 0, 0, 0, 0, 1, 0xaa}); again != base {
		t.Fatal("element is not deterministic")
	}
	for _, kat := range []struct{ name, got, want string }{
		{"kInt", hex.EncodeToString(kInt), "4eff142c80515c99156f58bf294e0f0b06a38b184250b4aa2a931705390f6b4f"},
		{"element", hex.EncodeToString(base[:]), "0481bef2b39e6954f448649622b873ee48309486af48542af855f37650d32efd"},
	} {
		if kat.got != kat.want {
			t.Errorf("%s = %s, want %s", kat.name, kat.got, kat.want)
		}
	}
}

// TestHeadSum: adding and removing elements in any order gives the same
// sum; removing everything gives zero.
func TestHeadSum(t *testing.T) {
	m := newMacer(integrityKey(t, internalKey))
	e := func(k string) [sha256.Size]byte { return m.element(bucketTerminals, []byte(k), []byte("v")) }
	var a, b head
	for _, k := range []string{"A", "B", "C"} {
		a.xor(e(k))
	}
	for _, k := range []string{"C", "A", "B", "D"} {
		b.xor(e(k))
	}
	b.xor(e("D"))
	if a.sum != b.sum {
		t.Fatal("the sum depends on the order")
	}
	for _, k := range []string{"B", "A", "C"} {
		a.xor(e(k))
	}
	if a.sum != ([sha256.Size]byte{}) {
		t.Fatal("removing every element does not give zero")
	}
}

func TestHeadCodec(t *testing.T) {
	h := head{counter: 42, count: [2]uint64{100000, 3}}
	for i := range h.sum {
		h.sum[i] = byte(i)
	}
	enc := h.encode()
	if len(enc) != headSize {
		t.Fatalf("encoded head of %d bytes, want %d", len(enc), headSize)
	}
	got, err := decodeHead(enc, 42)
	if err != nil || got != h {
		t.Fatalf("round trip: %v", err)
	}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"short", enc[:headSize-1]},
		{"long", append(bytes.Clone(enc), 0)},
		{"format", append([]byte{headFormat + 1}, enc[1:]...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := decodeHead(tc.b, 1); !errors.Is(err, errHead) {
				t.Fatalf("err = %v, want errHead", err)
			}
		})
	}
}

// FuzzDecodeHead: decoding never panics, and whatever decodes re-encodes to
// the same bytes.
func FuzzDecodeHead(f *testing.F) {
	f.Add((&head{count: [2]uint64{1, 2}}).encode())
	f.Add([]byte{headFormat})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeHead(b, 7)
		if err != nil {
			return
		}
		if !bytes.Equal(h.encode(), b) {
			t.Fatal("decoded head re-encodes differently")
		}
	})
}

func openInternal(t *testing.T) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "db"), Options{MasterKey: internalKey, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestVerifyWhileOpen: a change made to the file behind an open store (here
// through its own bbolt handle) is found by Verify; a write refuses to go
// on without a head.
func TestVerifyWhileOpen(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openInternal(t)
	tm := sampleTerminal(false)
	if err := s.CreateTerminal(ctx, tm); err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(ctx); err != nil {
		t.Fatalf("verify of an untouched store: %v", err)
	}
	raw := func(fn func(b *bolt.Bucket) error, bucket []byte) {
		t.Helper()
		if err := s.db.Update(func(tx *bolt.Tx) error { return fn(tx.Bucket(bucket)) }); err != nil {
			t.Fatal(err)
		}
	}
	var old []byte
	raw(func(b *bolt.Bucket) error { old = bytes.Clone(b.Get([]byte(tm.SN))); return nil }, bucketTerminals)
	disabled := tm.Clone()
	disabled.Status = keysvc.StatusDisabled
	if err := s.UpdateTerminal(ctx, disabled); err != nil {
		t.Fatal(err)
	}
	raw(func(b *bolt.Bucket) error { return b.Put([]byte(tm.SN), old) }, bucketTerminals)
	err := s.Verify(ctx)
	var te *TamperError
	if !errors.As(err, &te) || !errors.Is(err, ErrTampered) || te.ResealCode == "" {
		t.Fatalf("verify after a rollback: %v, want a *TamperError with a reseal code", err)
	}

	raw(func(b *bolt.Bucket) error { return b.Delete(keyHead) }, bucketMeta)
	if err := s.CreateTerminal(ctx, sampleTerminal(true)); !errors.Is(err, ErrTampered) {
		t.Fatalf("write without a head: %v, want ErrTampered", err)
	}
}

// BenchmarkHeadPerWrite is the CPU the integrity head adds to a write (all
// but bbolt's Put of the head): read and open the head, take the old
// record's element out and the new one's in, seal the head.
func BenchmarkHeadPerWrite(b *testing.B) {
	s, err := Open(filepath.Join(b.TempDir(), "db"), Options{MasterKey: internalKey, NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	tm := sampleTerminal(true)
	if err := s.CreateTerminal(context.Background(), tm); err != nil {
		b.Fatal(err)
	}
	v := s.seal(bucketTerminals, []byte(tm.SN), 2, encodeTerminal(nil, tm))
	b.ReportAllocs()
	s.db.View(func(tx *bolt.Tx) error {
		m := newMacer(s.kInt)
		for b.Loop() {
			h, why := s.headOf(tx)
			if why != "" {
				b.Fatal(why)
			}
			h.xor(m.element(bucketTerminals, []byte(tm.SN), v))
			h.xor(m.element(bucketTerminals, []byte(tm.SN), v))
			_ = s.seal(bucketMeta, keyHead, h.counter, h.encode())
		}
		return nil
	})
}

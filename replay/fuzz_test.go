package replay

import (
	"bytes"
	"testing"
)

// FuzzParseRecord: whatever parses re-encodes to the same bytes.
func FuzzParseRecord(f *testing.F) {
	good := encodeRecord(key{sn: [MaxSNLen]byte{'A', '1'}, n: 2, nonce: 42}, 1_796_000_000_000_000_000)
	f.Add(good[:])
	f.Add(make([]byte, recordSize))
	f.Add(good[:recordSize-1])
	f.Fuzz(func(t *testing.T, b []byte) {
		k, until, ok := parseRecord(b)
		if !ok {
			return
		}
		if again := encodeRecord(k, until); !bytes.Equal(again[:], b) {
			t.Fatalf("parsed %x, re-encoded %x", b, again)
		}
	})
}

// FuzzReadRecords: any file content loads without a panic, every record
// found is a valid record that occurs in the input, and the bytes read
// plus the bytes skipped are the whole input.
func FuzzReadRecords(f *testing.F) {
	a := encodeRecord(key{sn: [MaxSNLen]byte{'A'}, n: 1, nonce: 1}, 5)
	b := encodeRecord(key{sn: [MaxSNLen]byte{'B'}, n: 1, nonce: 2}, 6)
	f.Add(append(append([]byte{}, a[:]...), b[:]...))
	f.Add(append(append([]byte{}, a[:17]...), b[:]...))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, data []byte) {
		found := 0
		skipped, err := readRecords(bytes.NewReader(data), func(k key, until int64) {
			r := encodeRecord(k, until)
			if !bytes.Contains(data, r[:]) {
				t.Fatalf("record %x is not in the input", r)
			}
			found++
		})
		if err != nil {
			t.Fatal(err)
		}
		if int64(found*recordSize)+skipped != int64(len(data)) {
			t.Fatalf("%d records and %d skipped bytes of %d", found, skipped, len(data))
		}
	})
}

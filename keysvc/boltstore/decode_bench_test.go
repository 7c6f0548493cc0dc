package boltstore

import (
	"encoding/json"
	"testing"

	"github.com/m2mguard/m2mguard/keysvc"
)

// The record encoding was chosen by these two: the binary decoder against
// encoding/json on the same record (with a pending change).

func BenchmarkDecodeBinary(b *testing.B) {
	enc := encodeTerminal(nil, sampleTerminal(true))
	b.ReportAllocs()
	for range b.N {
		if _, err := decodeTerminal(enc); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeJSON(b *testing.B) {
	enc, err := json.Marshal(sampleTerminal(true))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for range b.N {
		var t keysvc.Terminal
		if err := json.Unmarshal(enc, &t); err != nil {
			b.Fatal(err)
		}
	}
}

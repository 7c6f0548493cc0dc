package boltstore_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/keysvc/storetest"
)

// The cost of the store's integrity head: a write, and Open (which checks
// every record once). Run:
//
//	go test ./keysvc/boltstore -run '^$' -bench . -benchtime 2s

// fill creates n terminals in s, in transactions of 10,000.
func fill(b *testing.B, s *boltstore.Store, n int) {
	b.Helper()
	ctx := context.Background()
	for i := 0; i < n; i += 10000 {
		var ts []*keysvc.Terminal
		for j := i; j < min(n, i+10000); j++ {
			ts = append(ts, storetest.Terminal(fmt.Sprintf("T%07d", j)))
		}
		if _, err := s.CreateTerminals(ctx, ts); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOpen100k(b *testing.B) {
	path := filepath.Join(b.TempDir(), "db")
	s, err := boltstore.Open(path, boltstore.Options{MasterKey: testKey, NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	fill(b, s, 100000)
	s.Close()
	for b.Loop() {
		s, err := boltstore.Open(path, boltstore.Options{MasterKey: testKey})
		if err != nil {
			b.Fatal(err)
		}
		s.Close()
	}
}

func BenchmarkUpdateTerminal(b *testing.B) {
	for _, sync := range []bool{false, true} {
		b.Run(fmt.Sprintf("fsync=%v", sync), func(b *testing.B) {
			s, err := boltstore.Open(filepath.Join(b.TempDir(), "db"), boltstore.Options{MasterKey: testKey, NoSync: !sync})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			fill(b, s, 10000)
			ctx := context.Background()
			recs := make([]*keysvc.Terminal, 100)
			for i := range recs {
				if recs[i], err = s.GetTerminal(ctx, fmt.Sprintf("T%07d", i*97)); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				t := recs[i%len(recs)]
				if err := s.UpdateTerminal(ctx, t); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

func BenchmarkCreateTerminal(b *testing.B) {
	s, err := boltstore.Open(filepath.Join(b.TempDir(), "db"), boltstore.Options{MasterKey: testKey, NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := s.CreateTerminal(ctx, storetest.Terminal(fmt.Sprintf("C%09d", i))); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

package replay

import (
	"context"
	"testing"
	"time"
)

// BenchmarkClaim measures one accepted claim: in memory, and with the
// write(2) of its record (no fsync; the background sync runs every second).
func BenchmarkClaim(b *testing.B) {
	for _, name := range []string{"memory", "file"} {
		b.Run(name, func(b *testing.B) {
			g := NewMemory(Options{})
			if name == "file" {
				var err error
				if g, err = Open(b.TempDir(), Options{Logger: quiet}); err != nil {
					b.Fatal(err)
				}
			}
			defer g.Close()
			ctx := context.Background()
			until := time.Now().Add(10 * time.Minute)
			var nonce uint64
			b.ReportAllocs()
			for b.Loop() {
				nonce++
				if ok, err := g.Claim(ctx, "A00MS8011390002S", nonce, until); !ok || err != nil {
					b.Fatal(ok, err)
				}
			}
		})
	}
}

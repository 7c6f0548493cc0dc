package keysvc_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

// benchTerminals is the population of the benchmark store (see BENCHMARKS.md).
const benchTerminals = 100_000

var bench struct {
	once     sync.Once
	dir      string
	store    *boltstore.Store
	svc      *keysvc.Service
	sns      []string
	setup    time.Duration
	setupErr error
}

// nextSN hands out serial numbers not yet registered (benchmarks run
// several times with growing b.N).
var nextSN atomic.Int64

func freshSNs(n int) int { return benchTerminals + int(nextSN.Add(int64(n))) - n }

func benchSN(i int) string { return fmt.Sprintf("B%07d", i) }

func benchCSV(from, n int) string {
	var sb strings.Builder
	sb.WriteString("sn,imei,imsi,msisdn,alg\n")
	for i := from; i < from+n; i++ {
		fmt.Fprintf(&sb, "%s,35693803%07d,46000%010d,,hs256\n", benchSN(i), i, i)
	}
	return sb.String()
}

// benchSetup registers benchTerminals terminals through Service.Import
// (batches of 1000 per bolt transaction, fsync on) in a fresh store.
func benchSetup(b *testing.B) {
	bench.once.Do(func() {
		dir, err := os.MkdirTemp("", "keysvc-bench")
		if err != nil {
			bench.setupErr = err
			return
		}
		bench.dir = dir
		bench.store, err = boltstore.Open(filepath.Join(dir, "bench.db"), boltstore.Options{MasterKey: bytes.Repeat([]byte{1}, 32)})
		if err != nil {
			bench.setupErr = err
			return
		}
		bench.svc, _ = keysvc.New(keysvc.Options{Store: bench.store})
		start := time.Now()
		rep, err := bench.svc.Import(context.Background(), strings.NewReader(benchCSV(0, benchTerminals)), keysvc.ImportOptions{})
		bench.setup = time.Since(start)
		if err == nil && rep.Created != benchTerminals {
			err = fmt.Errorf("imported %d of %d", rep.Created, benchTerminals)
		}
		bench.setupErr = err
		for i := range benchTerminals {
			bench.sns = append(bench.sns, benchSN(i))
		}
	})
	if bench.setupErr != nil {
		b.Fatal(bench.setupErr)
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	if bench.store != nil {
		bench.store.Close()
		if testing.Verbose() {
			fmt.Printf("bench setup: %d terminals imported in %v (%.0f/s, batches of 1000, fsync per batch)\n",
				benchTerminals, bench.setup.Round(time.Millisecond), float64(benchTerminals)/bench.setup.Seconds())
		}
	}
	if bench.dir != "" {
		os.RemoveAll(bench.dir)
	}
	os.Exit(code)
}

// BenchmarkImport: register throughput through the bulk path (CSV import,
// 1000 terminals per bolt transaction, fsync per transaction), into the
// 100k store. One op = one terminal.
func BenchmarkImport(b *testing.B) {
	benchSetup(b)
	csv := benchCSV(freshSNs(b.N), b.N)
	b.ResetTimer()
	rep, err := bench.svc.Import(context.Background(), strings.NewReader(csv), keysvc.ImportOptions{})
	if err != nil || rep.Created != b.N {
		b.Fatalf("import: %v, %d of %d created", err, rep.Created, b.N)
	}
}

// BenchmarkRegister: one Service.Register per op, one transaction and
// fsync each, into the 100k store.
func BenchmarkRegister(b *testing.B) {
	benchSetup(b)
	ctx := context.Background()
	base := freshSNs(b.N)
	b.ResetTimer()
	for i := range b.N {
		_, err := bench.svc.Register(ctx, keysvc.RegisterRequest{SN: benchSN(base + i),
			IMEI: "356938035643809", IMSI: "460001234567890"})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLookupCached: Service.Lookup of a cached terminal (the CONNECT hot path).
func BenchmarkLookupCached(b *testing.B) {
	benchSetup(b)
	ctx := context.Background()
	const hot = 4096
	for i := range hot {
		if _, err := bench.svc.Lookup(ctx, bench.sns[i*(benchTerminals/hot)]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if _, err := bench.svc.Lookup(ctx, bench.sns[(i%hot)*(benchTerminals/hot)]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLookupUncached: boltstore GetTerminal (read transaction, AES-GCM
// open, decode) of a random terminal among 100k.
func BenchmarkLookupUncached(b *testing.B) {
	benchSetup(b)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if _, err := bench.store.GetTerminal(ctx, bench.sns[(i*7919)%benchTerminals]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLoginVerifyHS256 is the baseline: one login-token verification
// (codec.Login.Verify, hs256) of a stored terminal.
func BenchmarkLoginVerifyHS256(b *testing.B) {
	benchSetup(b)
	t, err := bench.store.GetTerminal(context.Background(), bench.sns[42])
	if err != nil {
		b.Fatal(err)
	}
	l := codec.Login{Identity: t.Identity(), Alg: codec.HS256, TS: 1700000000, Nonce: 0x0123456789abcdef}
	if _, err := l.Sign(t.Creds.Up); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if !l.Verify(t.Creds.Up) {
			b.Fatal("login does not verify")
		}
	}
}

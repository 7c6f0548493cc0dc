package fleet

import (
	"context"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/stats"
	"github.com/m2mguard/m2mguard/replay"
)

// BenchmarkClaim measures one accepted replay claim: on the fleet's bucket
// (3 replicas on a 3-node cluster on loopback, the broker connected to a
// follower or the leader, whichever node 1 is), against the single
// broker's guards (replay package: in memory, and with the file). It
// reports the latency percentiles of the claims of the run.
//
//	go test ./fleet -run '^$' -bench BenchmarkClaim -benchtime 2000x
func BenchmarkClaim(b *testing.B) {
	guards := []struct {
		name string
		open func(b *testing.B) hook.ReplayGuard
	}{
		{"fleet-3-nodes", func(b *testing.B) hook.ReplayGuard {
			c := newCluster(b, 3, nil)
			return c.open("bench", 0, nil)
		}},
		{"fleet-1-node", func(b *testing.B) hook.ReplayGuard {
			c := newCluster(b, 1, nil)
			return c.open("bench", 0, nil)
		}},
		{"replay-memory", func(b *testing.B) hook.ReplayGuard {
			g := replay.NewMemory(replay.Options{})
			b.Cleanup(func() { _ = g.Close() })
			return g
		}},
		{"replay-file", func(b *testing.B) hook.ReplayGuard {
			g, err := replay.Open(b.TempDir(), replay.Options{Logger: testLogger()})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = g.Close() })
			return g
		}},
	}
	for _, gd := range guards {
		b.Run(gd.name, func(b *testing.B) {
			g := gd.open(b)
			ctx := context.Background()
			until := time.Now().Add(5 * time.Minute)
			lat := make([]time.Duration, 0, 4096)
			var nonce uint64
			b.ResetTimer()
			for b.Loop() {
				nonce++
				start := time.Now()
				ok, err := g.Claim(ctx, testSN, nonce, until)
				lat = append(lat, time.Since(start))
				if !ok || err != nil {
					b.Fatal(ok, err)
				}
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(stats.MS(stats.Percentile(lat, 50)), "p50-ms")
			b.ReportMetric(stats.MS(stats.Percentile(lat, 99)), "p99-ms")
		})
	}
}

// BenchmarkClaimParallel measures claims from many logins at once on one
// broker of a 3-node cluster: the throughput of the fleet's replay guard.
//
//	go test ./fleet -run '^$' -bench BenchmarkClaimParallel -benchtime 5000x
func BenchmarkClaimParallel(b *testing.B) {
	c := newCluster(b, 3, nil)
	f := c.open("bench", 0, nil)
	ctx := context.Background()
	until := time.Now().Add(5 * time.Minute)
	var nonce atomic.Uint64
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if ok, err := f.Claim(ctx, testSN, nonce.Add(1), until); !ok || err != nil {
				b.Error(ok, err)
				return
			}
		}
	})
}

// BenchmarkLiveLogin measures whole logins of one terminal (a paho CONNECT
// with a fresh token, the CONNACK, a DISCONNECT; one at a time) on a live
// broker with the hook: with today's per-broker guards (replay in memory,
// local throttle) and in fleet mode (claims and throttle on a 3-node
// cluster). Run both in one go for the ratio:
//
//	go test ./fleet -run '^$' -bench BenchmarkLiveLogin -benchtime 2000x -count 3
func BenchmarkLiveLogin(b *testing.B) {
	for _, mode := range []string{"single-broker", "fleet-3-nodes", "fleet-3-nodes-claims-only"} {
		b.Run(mode, func(b *testing.B) {
			svc, term := liveKeyService(b)
			var br liveBroker
			if mode == "single-broker" {
				br = startLiveBroker(b, svc, replay.NewMemory(replay.Options{}), hook.NewThrottleTable(hook.ThrottleOptions{}))
			} else {
				c := newCluster(b, 3, nil)
				f := c.open("bench", 0, nil)
				th := f.Throttler(hook.NewThrottleTable(hook.ThrottleOptions{}))
				if mode == "fleet-3-nodes-claims-only" {
					th = hook.NewThrottleTable(hook.ThrottleOptions{})
				}
				br = startLiveBroker(b, svc, f, th)
			}
			user := term.IMEI + ":" + term.IMSI
			var lat []time.Duration
			b.ResetTimer()
			for b.Loop() {
				token := loginToken(b, term, term.Creds.Up)
				start := time.Now()
				if !br.connect(b, testSN, user, token) {
					b.Fatal("login refused")
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lat)
			var sum time.Duration
			for _, d := range lat {
				sum += d
			}
			b.ReportMetric(float64(len(lat))/sum.Seconds(), "logins/s")
			b.ReportMetric(stats.MS(stats.Percentile(lat, 50)), "p50-ms")
			b.ReportMetric(stats.MS(stats.Percentile(lat, 99)), "p99-ms")
		})
	}
}

package fleet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

const testSN = "A00MS8011390002S"

// TestClaimOneWinnerAcrossNodes: the same (sn, nonce) claimed at once by
// three brokers, each connected to another node of the cluster, is
// accepted exactly once, round after round; a second claim of a pair is a
// replay on every broker.
func TestClaimOneWinnerAcrossNodes(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	fs := []*Fleet{c.open("a", 0, nil), c.open("b", 1, nil), c.open("c", 2, nil)}
	ctx := context.Background()
	until := time.Now().Add(time.Minute)
	rounds := 200
	if testing.Short() {
		rounds = 50
	}
	for r := range rounds {
		nonce := uint64(0xC0FFEE00) + uint64(r)
		var wins atomic.Int32
		var wg sync.WaitGroup
		start := make(chan struct{})
		for _, f := range fs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				ok, err := f.Claim(ctx, testSN, nonce, until)
				if err != nil {
					t.Errorf("round %d: broker %s: %v", r, f.BrokerID(), err)
				}
				if ok {
					wins.Add(1)
				}
			}()
		}
		close(start)
		wg.Wait()
		if got := wins.Load(); got != 1 {
			t.Fatalf("round %d: %d brokers accepted the same pair, want 1", r, got)
		}
	}
	for _, f := range fs {
		if ok, err := f.Claim(ctx, testSN, 0xC0FFEE00, until); ok || err != nil {
			t.Fatalf("broker %s accepted a replay: %v %v", f.BrokerID(), ok, err)
		}
	}
	// Another terminal's pair with the same nonce is a different claim.
	if ok, err := fs[0].Claim(ctx, "B00MS8011390003S", 0xC0FFEE00, until); !ok || err != nil {
		t.Fatalf("another sn: %v %v", ok, err)
	}
	first := testutil.ToFloat64(fs[0].m.claims.WithLabelValues("first")) + testutil.ToFloat64(fs[1].m.claims.WithLabelValues("first")) + testutil.ToFloat64(fs[2].m.claims.WithLabelValues("first"))
	if int(first) != rounds+1 {
		t.Fatalf("m2mguard_fleet_claims_total{result=first} = %v over the brokers, want %d", first, rounds+1)
	}
}

// TestClaimExpires: a claim lasts the bucket's TTL (2 × Skew +
// ClaimMargin), then the pair may be claimed again; a claim that must
// outlive the TTL is refused, never remembered too briefly.
func TestClaimExpires(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	f := c.open("a", 0, func(o *Options) { o.Skew = 300 * time.Millisecond; o.ClaimMargin = 400 * time.Millisecond })
	ctx := context.Background()
	if ok, err := f.Claim(ctx, testSN, 7, time.Now().Add(300*time.Millisecond)); !ok || err != nil {
		t.Fatalf("first claim: %v %v", ok, err)
	}
	if ok, err := f.Claim(ctx, testSN, 7, time.Now().Add(300*time.Millisecond)); ok || err != nil {
		t.Fatalf("replay within the TTL: %v %v", ok, err)
	}
	claimedAt := time.Now()
	checkFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		ok, err := f.Claim(ctx, testSN, 7, time.Now().Add(300*time.Millisecond))
		if err != nil || !ok {
			return fmt.Errorf("still claimed: %v %v", ok, err)
		}
		return nil
	})
	if since := time.Since(claimedAt); since < 900*time.Millisecond {
		t.Fatalf("claim expired after %s, before the TTL of 1 s", since)
	}
	if _, err := f.Claim(ctx, testSN, 8, time.Now().Add(2*time.Second)); !errors.Is(err, ErrClaimTooLong) {
		t.Fatalf("claim beyond the TTL: %v, want ErrClaimTooLong", err)
	}
}

// TestClaimSurvivesRestart: claims are on file storage; after every node
// of the cluster restarts, a claimed pair is still a replay.
func TestClaimSurvivesRestart(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	f := c.open("a", 0, nil)
	ctx := context.Background()
	until := time.Now().Add(time.Minute)
	if ok, err := f.Claim(ctx, testSN, 42, until); !ok || err != nil {
		t.Fatalf("claim: %v %v", ok, err)
	}
	c.shutdown()
	for i := range c.nodes {
		c.start(i)
	}
	c.waitReady()
	checkFor(t, 20*time.Second, 100*time.Millisecond, func() error {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		ok, err := f.Claim(cctx, testSN, 42, until)
		if err != nil {
			return err
		}
		if ok {
			t.Fatal("a claimed pair was accepted again after the restart")
		}
		return nil
	})
}

// TestClaimLeaderKilled: a storm of claims from three brokers while the
// node leading the replay bucket's stream, then the JetStream meta leader,
// is killed and restarted. Every pair is claimed twice (the attack) by two
// brokers, and fresh pairs once (genuine logins): no pair is ever accepted
// twice, a genuine pair is never called a replay (at worst it errors, the
// terminal retries), the unavailable window errors rather than answers,
// and claims succeed again after each election.
//
// M2MGUARD_FLEET_STORM=30s makes each phase's storm longer.
func TestClaimLeaderKilled(t *testing.T) {
	t.Parallel()
	storm := 3 * time.Second
	if d, err := time.ParseDuration(os.Getenv("M2MGUARD_FLEET_STORM")); err == nil {
		storm = d
	}
	c := newCluster(t, 3, nil)
	fs := []*Fleet{c.open("a", 0, nil), c.open("b", 1, nil), c.open("c", 2, nil)}
	until := time.Now().Add(10 * time.Minute)

	var nonce atomic.Uint64
	var accepted sync.Map // nonce → *atomic.Int32
	var firsts, replays, unavailable, genuineReplays atomic.Int64
	var otherErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	worker := func(w int) {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			n := nonce.Add(1)
			attack := n%2 == 0
			claimers := []*Fleet{fs[w%3]}
			if attack {
				claimers = append(claimers, fs[(w+1)%3])
			}
			var cwg sync.WaitGroup
			for _, f := range claimers {
				cwg.Add(1)
				go func() {
					defer cwg.Done()
					ok, err := f.Claim(context.Background(), testSN, n, until)
					switch {
					case errors.Is(err, ErrUnavailable):
						unavailable.Add(1)
					case err != nil:
						otherErr.Store(err)
					case ok:
						firsts.Add(1)
						v, _ := accepted.LoadOrStore(n, new(atomic.Int32))
						v.(*atomic.Int32).Add(1)
					default:
						replays.Add(1)
						if !attack {
							genuineReplays.Add(1)
						}
					}
				}()
			}
			cwg.Wait()
		}
	}
	for w := range 6 {
		wg.Add(1)
		go worker(w)
	}
	// claimsResume waits until every broker claims a fresh pair.
	claimsResume := func(phase string) {
		for _, f := range fs {
			checkFor(t, 30*time.Second, 50*time.Millisecond, func() error {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				defer cancel()
				ok, err := f.Claim(ctx, "Z00PROBE", nonce.Add(1)+1<<62, until)
				if err != nil || !ok {
					return fmt.Errorf("%s: broker %s: %v %v", phase, f.BrokerID(), ok, err)
				}
				return nil
			})
		}
	}
	time.Sleep(storm / 3) // the storm runs against a healthy cluster first
	victim := c.streamLeader("KV_" + ReplayBucket)
	if victim < 0 {
		t.Fatal("no leader of the replay stream")
	}
	t.Logf("killing n%d, leader of the replay stream (meta leader: n%d)", victim+1, c.metaLeader()+1)
	c.stop(victim)
	time.Sleep(storm / 3)
	claimsResume("after the stream leader was killed")
	c.start(victim)
	c.waitReady()
	meta := c.metaLeader()
	checkFor(t, 20*time.Second, 50*time.Millisecond, func() error {
		if meta = c.metaLeader(); meta < 0 {
			return errors.New("no meta leader")
		}
		return nil
	})
	t.Logf("killing n%d, meta leader (replay stream leader: n%d)", meta+1, c.streamLeader("KV_"+ReplayBucket)+1)
	c.stop(meta)
	time.Sleep(storm / 3)
	claimsResume("after the meta leader was killed")
	c.start(meta)
	c.waitReady()
	close(stop)
	wg.Wait()
	claimsResume("after the storm")

	if err := otherErr.Load(); err != nil {
		t.Errorf("a claim failed with an error that is not ErrUnavailable: %v", err)
	}
	twice := 0
	accepted.Range(func(_, v any) bool {
		if v.(*atomic.Int32).Load() > 1 {
			twice++
		}
		return true
	})
	t.Logf("claims: %d first, %d replay, %d unavailable; pairs accepted twice: %d; genuine pairs called a replay: %d",
		firsts.Load(), replays.Load(), unavailable.Load(), twice, genuineReplays.Load())
	if twice != 0 {
		t.Fatalf("%d pairs accepted twice", twice)
	}
	if genuineReplays.Load() != 0 {
		t.Fatalf("%d genuine claims answered as replays (a lockout)", genuineReplays.Load())
	}
	if firsts.Load() == 0 || replays.Load() == 0 {
		t.Fatal("the storm did not run")
	}
	for _, f := range fs {
		if !f.Available() {
			t.Errorf("broker %s still unavailable", f.BrokerID())
		}
	}
}

// TestClaimUnavailableFailsClosed: with the cluster gone, a claim returns
// ErrUnavailable after ClaimTimeout (never true), the fleet reports
// itself unavailable (metric and event) and available again afterwards.
func TestClaimUnavailableFailsClosed(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	reg := prometheus.NewRegistry()
	f := c.open("a", 0, func(o *Options) { o.ClaimTimeout = 300 * time.Millisecond; o.Registerer = reg })
	c.stop(0)
	ok, err := f.Claim(context.Background(), testSN, 9, time.Now().Add(time.Minute))
	if ok || !errors.Is(err, ErrUnavailable) {
		t.Fatalf("claim without NATS: %v %v, want false and ErrUnavailable", ok, err)
	}
	if f.Available() || testutil.ToFloat64(f.m.available) != 0 {
		t.Fatal("fleet still reports itself available")
	}
	if got := testutil.ToFloat64(f.m.claims.WithLabelValues("unavailable")); got != 1 {
		t.Fatalf("claims{unavailable} = %v", got)
	}
	c.start(0)
	c.waitReady()
	// A fresh nonce per attempt, as a terminal's retry has: an attempt that
	// failed may still land (nats.go sends what it buffered while
	// disconnected), which claims its pair for nobody.
	nonce := uint64(10)
	checkFor(t, 20*time.Second, 50*time.Millisecond, func() error {
		nonce++
		ok, err := f.Claim(context.Background(), testSN, nonce, time.Now().Add(time.Minute))
		if err != nil || !ok {
			return fmt.Errorf("%v %v", ok, err)
		}
		return nil
	})
	if !f.Available() {
		t.Fatal("not available after a claim succeeded")
	}
	if got := testutil.ToFloat64(f.m.unavailable); got < 1 {
		t.Fatalf("m2mguard_fleet_unavailable_total = %v", got)
	}
}

package fleet

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// TestCreateAssetAttempts: createAsset's first attempt is short and each
// next one longer, up to assetTimeout, so that an answer JetStream never
// sends (a request before a leader exists) costs a moment, and a slow
// answer still comes; replicas a server refuses end it at once.
func TestCreateAssetAttempts(t *testing.T) {
	t.Parallel()
	// silent never answers; answer answers when the attempt may wait at
	// least need.
	silent := func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
	tests := []struct {
		name     string
		timeout  time.Duration
		op       func(n int, ctx context.Context) error // n: the attempt, from 0
		wantErr  func(error) bool
		attempts int // 0: any
	}{
		{"two answers lost, then a leader", 20 * time.Second, func(n int, ctx context.Context) error {
			if n < 2 {
				return silent(ctx)
			}
			return nil
		}, nil, 3},
		{"a slow link still answered", 20 * time.Second, func(_ int, ctx context.Context) error {
			if dl, _ := ctx.Deadline(); time.Until(dl) < 700*time.Millisecond {
				return silent(ctx)
			}
			return nil
		}, nil, 0},
		{"replicas refused at once", 20 * time.Second, func(int, context.Context) error {
			return &jetstream.APIError{Code: 500, ErrorCode: codeReplicasNotSupported, Description: "replicas > 1 not supported in non-clustered mode"}
		}, func(err error) bool { return apiCode(err) == codeReplicasNotSupported }, 1},
		{"no answer until ctx ends", 600 * time.Millisecond, func(_ int, ctx context.Context) error {
			return silent(ctx)
		}, func(err error) bool { return errors.Is(err, context.DeadlineExceeded) }, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(t.Context(), tc.timeout)
			defer cancel()
			var budgets []time.Duration // each attempt's time to answer
			err := createAsset(ctx, placeable, func(ctx context.Context) error {
				dl, _ := ctx.Deadline()
				budgets = append(budgets, time.Until(dl))
				return tc.op(len(budgets)-1, ctx)
			})
			t.Logf("attempts %v: %v", budgets, err)
			if tc.wantErr == nil && err != nil || tc.wantErr != nil && !tc.wantErr(err) {
				t.Fatalf("error %v", err)
			}
			if tc.attempts > 0 && len(budgets) != tc.attempts {
				t.Fatalf("%d attempts, want %d", len(budgets), tc.attempts)
			}
			if budgets[0] > 250*time.Millisecond {
				t.Errorf("first attempt may wait %v, more than 250 ms", budgets[0])
			}
			for i, b := range budgets {
				if b > assetTimeout {
					t.Errorf("attempt %d may wait %v, more than %v", i, b, assetTimeout)
				}
			}
			if len(budgets) >= 3 && budgets[2] <= 500*time.Millisecond {
				t.Errorf("the third attempt may wait only %v: attempts do not grow towards %v", budgets[2], assetTimeout)
			}
		})
	}
}

// TestOpenWaitsForMetaLeader: Open on a cluster without a meta leader (one
// node of three up) waits, and fails with ErrNotReady when its context
// ends; once a majority is up, an Open under way creates the assets with
// three replicas.
func TestOpenWaitsForMetaLeader(t *testing.T) {
	t.Parallel()
	c := defineCluster(t, 3, nil)
	c.start(0)
	ctx, cancel := context.WithTimeout(t.Context(), 1500*time.Millisecond)
	defer cancel()
	o := c.testOptions("a", 0)
	if f, err := Open(ctx, o); err == nil {
		f.Close()
		t.Fatal("Open succeeded on one node of three")
	} else if !errors.Is(err, ErrNotReady) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Open on one node of three: %v, want ErrNotReady and the deadline", err)
	} else {
		t.Logf("one node of three: %v", err)
	}

	type result struct {
		f   *Fleet
		err error
	}
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		f, err := Open(ctx, c.testOptions("b", 0))
		done <- result{f, err}
	}()
	start := time.Now()
	c.start(1)
	c.start(2)
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.f.Close() })
	t.Logf("opened %v after the second and third nodes started", time.Since(start).Round(time.Millisecond))
	if r.f.Replicas() != 3 {
		t.Fatalf("replicas = %d, want 3", r.f.Replicas())
	}
}

// TestOpenTogether: three brokers open the fleet at once on a cluster
// whose nodes have just started (no meta leader yet), as a fleet of
// brokers with embedded nodes starts: each creates every asset, all get
// answers, and a claim made through one is a replay through the others.
func TestOpenTogether(t *testing.T) {
	t.Parallel()
	c := defineCluster(t, 3, nil)
	for i := range 3 {
		c.start(i)
	}
	start := time.Now()
	fleets := make([]*Fleet, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i, id := range []string{"a", "b", "c"} {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			fleets[i], errs[i] = Open(ctx, c.testOptions(id, i))
			if errs[i] == nil {
				t.Logf("%s open after %v", id, time.Since(start).Round(time.Millisecond))
			}
		})
	}
	wg.Wait()
	for i, f := range fleets {
		if f != nil {
			t.Cleanup(func() { f.Close() })
		}
		if errs[i] != nil {
			t.Fatalf("broker %d: %v", i, errs[i])
		}
		if f.Replicas() != 3 {
			t.Fatalf("broker %d: replicas = %d, want 3", i, f.Replicas())
		}
	}
	until := time.Now().Add(time.Minute)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if ok, err := fleets[0].Claim(ctx, testSN, 7, until); !ok || err != nil {
		t.Fatalf("claim through a: %v %v", ok, err)
	}
	for _, f := range fleets[1:] {
		if ok, err := f.Claim(ctx, testSN, 7, until); ok || err != nil {
			t.Fatalf("the same claim through %s: %v %v, want a replay", f.BrokerID(), ok, err)
		}
	}
}

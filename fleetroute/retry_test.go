package fleetroute

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestRetryAttempts: createRetry's first attempt waits firstCreateAttempt
// and each next one twice as long up to its bound (a create JetStream
// never answers costs a moment, a slow answer still comes); retry keeps
// one attempt bound throughout.
func TestRetryAttempts(t *testing.T) {
	t.Parallel()
	silent := func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
	tests := []struct {
		name  string
		run   func(ctx context.Context, fn func(ctx context.Context) error) error
		lost  int           // attempts never answered before one that is
		first time.Duration // the first attempt's bound
		last  time.Duration // the bound of the attempt answered
	}{
		{"createRetry to 1 s", func(ctx context.Context, fn func(ctx context.Context) error) error {
			return createRetry(ctx, time.Second, fn)
		}, 2, 250 * time.Millisecond, time.Second},
		{"retry 300 ms", func(ctx context.Context, fn func(ctx context.Context) error) error {
			return retry(ctx, 300*time.Millisecond, fn)
		}, 2, 300 * time.Millisecond, 300 * time.Millisecond},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			var budgets []time.Duration
			err := tc.run(ctx, func(ctx context.Context) error {
				dl, _ := ctx.Deadline()
				budgets = append(budgets, time.Until(dl))
				if len(budgets) <= tc.lost {
					return silent(ctx)
				}
				return nil
			})
			t.Logf("attempts %v", budgets)
			if err != nil {
				t.Fatal(err)
			}
			if len(budgets) != tc.lost+1 {
				t.Fatalf("%d attempts, want %d", len(budgets), tc.lost+1)
			}
			for i, b := range budgets {
				if i == 0 && b > tc.first || b > tc.last {
					t.Errorf("attempt %d may wait %v, more than %v", i, b, min(tc.first, tc.last))
				}
			}
			if b := budgets[tc.lost]; tc.last > tc.first && b <= 2*tc.first {
				t.Errorf("the last attempt may wait only %v: attempts do not grow towards %v", b, tc.last)
			}
		})
	}
	// The context's end is in the error.
	ctx, cancel := context.WithTimeout(t.Context(), 400*time.Millisecond)
	defer cancel()
	if err := createRetry(ctx, time.Second, silent); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("no answer until the context ends: %v", err)
	}
}

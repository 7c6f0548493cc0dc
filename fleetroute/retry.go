package fleetroute

import (
	"context"
	"fmt"
	"time"
)

// retry runs fn until it succeeds or ctx ends, each attempt bounded by
// attempt (a request lost with a failed JetStream leader is sent again to
// the new one), pausing 20 ms, doubling up to 250 ms, between attempts.
func retry(ctx context.Context, attempt time.Duration, fn func(ctx context.Context) error) error {
	return retryGrowing(ctx, attempt, attempt, fn)
}

// firstCreateAttempt bounds the first attempt at creating (or updating) a
// stream or consumer (createRetry).
const firstCreateAttempt = 250 * time.Millisecond

// createRetry is retry for the creation of a stream or consumer: its first
// attempt waits firstCreateAttempt for the answer, each next one twice as
// long up to last. JetStream answers an update of a stream only from the
// stream's leader: while brokers start together, the update that follows
// another broker's create of the same stream (CreateOrUpdateStream is an
// update first) reaches a Raft group still electing its first leader, and
// is never answered; its retry, a moment later, is. A slow link still
// gets the longer attempts.
func createRetry(ctx context.Context, last time.Duration, fn func(ctx context.Context) error) error {
	return retryGrowing(ctx, min(firstCreateAttempt, last), last, fn)
}

// retryGrowing is retry whose first attempt is bounded by first and each
// next by twice the previous, up to last; after an attempt that ran out
// of time it does not pause.
func retryGrowing(ctx context.Context, first, last time.Duration, fn func(ctx context.Context) error) error {
	attempt, pause := first, 20*time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, attempt)
		err := fn(actx)
		waited := actx.Err() != nil // the attempt's time ran out
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w (%w)", err, ctx.Err())
		}
		if waited && attempt < last {
			attempt = min(2*attempt, last)
			continue
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (%w)", err, ctx.Err())
		case <-time.After(pause):
		}
		pause = min(2*pause, 250*time.Millisecond)
	}
}

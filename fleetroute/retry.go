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
	pause := 20 * time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, attempt)
		err := fn(actx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (%w)", err, ctx.Err())
		case <-time.After(pause):
		}
		pause = min(2*pause, 250*time.Millisecond)
	}
}

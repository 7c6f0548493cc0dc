package fleet

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// opTimeout bounds a directory operation or Publish whose context has no
// deadline: longer than a JetStream leader election.
const opTimeout = 5 * time.Second

// attemptTimeout bounds one attempt, so that a request lost with a failed
// leader is sent again to the new one.
const attemptTimeout = time.Second

// retry runs op until it succeeds, fails for good (not transient), or
// ctx ends (after opTimeout if ctx has no deadline), with back-off.
func retry(ctx context.Context, op func(ctx context.Context) error) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opTimeout)
		defer cancel()
	}
	backoff := 20 * time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, attemptTimeout)
		err := op(actx)
		cancel()
		if err == nil || !transient(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 250*time.Millisecond)
	}
}

// codeClusterNotAvailable is JetStream's "system temporarily unavailable".
const codeClusterNotAvailable jetstream.ErrorCode = 10008

// transient reports an error that the same operation may not meet again
// soon: a timeout, no leader or no quorum yet, a connection being
// re-established.
func transient(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse) ||
		errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, nats.ErrConnectionDraining) ||
		apiCode(err) == codeClusterNotAvailable
}

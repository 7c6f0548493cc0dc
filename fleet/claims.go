package fleet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/m2mguard/m2mguard/hook"
)

// ErrUnavailable is wrapped by a Claim that could not tell within
// ClaimTimeout whether the pair was claimed before: NATS unreachable, or
// the replay bucket without a leader or quorum. The hook refuses the
// message (MQTT 5 0x88 server unavailable); the terminal retries later.
var ErrUnavailable = errors.New("fleet: jetstream unavailable")

// ErrClaimTooLong is returned for a claim that must outlive the replay
// bucket's TTL (2 × Options.Skew + Options.ClaimMargin): Options.Skew is smaller
// than the hook's skew. The message is refused rather than remembered too
// briefly.
var ErrClaimTooLong = errors.New("fleet: claim outlives the replay bucket: Options.Skew is below the hook's skew")

// claimTTL is the replay bucket's MaxAge: a message passes the skew check
// for at most 2 × Skew (its timestamp up to Skew ahead of the clock, then
// Skew more), plus the margin.
func (f *Fleet) claimTTL() time.Duration { return 2*f.opts.Skew + f.opts.ClaimMargin }

// ReplayKey is the replay bucket's key of a pair: the escaped serial
// number, '.', and the nonce as 16 hex digits.
func ReplayKey(sn string, nonce uint64) (string, error) {
	k, err := EscapeKey(sn)
	if err != nil {
		return "", err
	}
	return k + "." + fmt.Sprintf("%016x", nonce), nil
}

// Claim claims (sn, nonce) for the whole fleet, atomically: exactly one
// Claim of a pair returns true, on whichever broker, until the pair
// expires with the bucket's TTL. It implements hook.ReplayGuard.
//
// It is a JetStream KV Create, which the replay bucket's leader accepts
// only if the key does not exist. While JetStream cannot answer (no
// connection, no leader, no quorum) Claim retries with back-off for up to
// ClaimTimeout, which covers a leader election, and then fails closed: it
// returns an error wrapping ErrUnavailable and the hook refuses the
// message. It never falls back to a local answer: ClientID affinity does
// not hold during a failover (a terminal may reach another broker), so a
// local claim could accept a replay.
func (f *Fleet) Claim(ctx context.Context, sn string, nonce uint64, until time.Time) (bool, error) {
	start := time.Now()
	if until.Sub(start) > f.claimTTL()-f.opts.ClaimMargin/4 {
		f.log.Error("m2mguard fleet_claim_too_long", "event", "fleet_claim_too_long", "sn", sn, "skew", f.opts.Skew)
		f.m.claims.WithLabelValues("unavailable").Inc()
		return false, ErrClaimTooLong
	}
	key, err := ReplayKey(sn, nonce)
	if err != nil {
		return false, fmt.Errorf("fleet: claim: %w", err)
	}
	if f.nc.IsClosed() {
		f.m.claims.WithLabelValues("unavailable").Inc()
		return false, fmt.Errorf("%w: %w", ErrUnavailable, ErrClosed)
	}
	ok, err := f.claim(ctx, key, start)
	f.m.claimSeconds.Observe(time.Since(start).Seconds())
	switch {
	case err != nil:
		f.m.claims.WithLabelValues("unavailable").Inc()
	case ok:
		f.m.claims.WithLabelValues("first").Inc()
	default:
		f.m.claims.WithLabelValues("replay").Inc()
	}
	return ok, err
}

// claim is Claim's retry loop. Each attempt's value is unique, so that an
// attempt whose answer was lost (a timeout after the leader had stored it)
// is recognised by the next: the key holds our own value, the claim is
// ours, not a replay.
func (f *Fleet) claim(ctx context.Context, key string, start time.Time) (bool, error) {
	ctx, cancel := context.WithDeadline(ctx, start.Add(f.opts.ClaimTimeout))
	defer cancel()
	value := f.claimValue()
	backoff := 10 * time.Millisecond
	var lastErr error
	sent := false // an attempt may have been stored
	for {
		// One attempt may not take the whole budget: a request lost with a
		// failed leader is retried on the new one.
		actx, acancel := context.WithTimeout(ctx, max(f.opts.ClaimTimeout/4, 100*time.Millisecond))
		_, err := f.replay.Create(actx, key, value)
		acancel()
		switch {
		case err == nil:
			f.setAvailable(true, "")
			return true, nil
		case errors.Is(err, jetstream.ErrKeyExists):
			f.setAvailable(true, "")
			if sent {
				return f.ownClaim(ctx, key, value)
			}
			return false, nil
		}
		lastErr = err
		sent = sent || !errors.Is(err, jetstream.ErrNoStreamResponse) && !errors.Is(err, context.Canceled)
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				f.setAvailable(false, "replay claim: "+lastErr.Error())
			}
			return false, fmt.Errorf("%w: claim: %w", ErrUnavailable, lastErr)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 200*time.Millisecond)
	}
}

// ownClaim tells whether the existing key holds value: an earlier attempt
// of this claim stored it and its answer was lost.
func (f *Fleet) ownClaim(ctx context.Context, key string, value []byte) (bool, error) {
	for {
		e, err := f.replay.Get(ctx, key)
		if err == nil {
			return bytes.Equal(e.Value(), value), nil
		}
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			// Create saw the key, this read (from a replica that lags, or
			// after the key expired) does not: the claim cannot tell.
			return false, fmt.Errorf("%w: claim check: the key is not readable", ErrUnavailable)
		}
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("%w: claim check: %w", ErrUnavailable, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// claimValue is the value of one claim: the broker id and a random tag.
// It carries nothing of the message.
func (f *Fleet) claimValue() []byte {
	var tag [8]byte
	_, _ = rand.Read(tag[:])
	return []byte(f.opts.BrokerID + " " + hex.EncodeToString(tag[:]) + " " + strconv.FormatInt(time.Now().Unix(), 10))
}

var _ hook.ReplayGuard = (*Fleet)(nil)

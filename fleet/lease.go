package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// LeaseOptions configure a Lease.
type LeaseOptions struct {
	// TTL is how long a holder keeps the lease without renewing it; the
	// holder renews every TTL/3 and gives it up itself after TTL × 2/3
	// without a renewal, so the others take it over TTL after the holder's
	// last renewal at most (clocks may differ by up to TTL/3). 0 = 6 s.
	TTL time.Duration
	// OnGain and OnLoss are called, on the lease's goroutine, when this
	// broker gains and loses (or releases) the lease.
	OnGain, OnLoss func()
}

// Lease is a fleet-wide lease: at most one broker holds it at a time, for
// work that must run once per fleet (expiry sweeps, SMS retries, the
// directory sweep). It lives in the KV bucket M2MGUARD_LEASES: the holder
// writes its id and an expiry with a check-and-set on the key's revision,
// so two brokers can never both succeed.
type Lease struct {
	f        *Fleet
	name     string
	key      string
	o        LeaseOptions
	held     atomic.Bool
	rev      uint64 // the revision we wrote; only the goroutine touches it
	stopOnce sync.Once
	stopCh   chan struct{}
	done     chan struct{}
}

// leaseValue is the value of a lease key.
type leaseValue struct {
	Holder string `json:"holder"`
	Until  int64  `json:"until_ms"` // unix milliseconds, by the holder's clock
}

// Lease starts competing for the named lease (1 to 64 of [A-Za-z0-9_-]) and
// keeps doing so until Stop or Close.
func (f *Fleet) Lease(name string, o LeaseOptions) (*Lease, error) {
	if !methodRE.MatchString(name) {
		return nil, fmt.Errorf("fleet: lease name %q", name)
	}
	if o.TTL <= 0 {
		o.TTL = 6 * time.Second
	}
	key, err := EscapeKey(name)
	if err != nil {
		return nil, err
	}
	l := &Lease{f: f, name: name, key: key, o: o, stopCh: make(chan struct{}), done: make(chan struct{})}
	if !f.addCloser(l.Stop) {
		return nil, ErrClosed
	}
	f.m.leaseHeld.WithLabelValues(name).Set(0)
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		defer close(l.done)
		l.run()
	}()
	return l, nil
}

// Held reports whether this broker holds the lease now.
func (l *Lease) Held() bool { return l.held.Load() }

// Stop releases the lease if held (OnLoss is called) and stops competing;
// it waits for the lease's goroutine.
func (l *Lease) Stop() {
	l.stopOnce.Do(func() { close(l.stopCh) })
	<-l.done
}

func (l *Lease) run() {
	period := l.o.TTL / 3
	var renewed time.Time // start of the last successful write
	for {
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), period)
		if l.held.Load() {
			err := l.renew(ctx, start)
			switch {
			case err == nil:
				renewed = start
			case errors.Is(err, errLeaseTaken) || time.Since(renewed) >= l.o.TTL*2/3:
				l.lose("renewal failed: " + err.Error())
			}
		} else if l.acquire(ctx, start) == nil {
			renewed = start
			l.gain()
		}
		cancel()
		wait := time.NewTimer(period - time.Since(start))
		select {
		case <-l.stopCh:
			wait.Stop()
			l.release()
			return
		case <-wait.C:
		}
	}
}

var errLeaseTaken = errors.New("fleet: lease held by another broker")

func (l *Lease) value(start time.Time) []byte {
	v, _ := json.Marshal(leaseValue{Holder: l.f.opts.BrokerID, Until: start.Add(l.o.TTL).UnixMilli()})
	return v
}

// acquire takes the lease if it is free, expired, or ours from before.
func (l *Lease) acquire(ctx context.Context, start time.Time) error {
	e, err := l.f.leases.Get(ctx, l.key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		rev, err := l.f.leases.Create(ctx, l.key, l.value(start))
		if err != nil {
			return err
		}
		l.rev = rev
		return nil
	}
	if err != nil {
		return err
	}
	var v leaseValue
	if json.Unmarshal(e.Value(), &v) == nil && v.Holder != l.f.opts.BrokerID && time.UnixMilli(v.Until).After(start) {
		return errLeaseTaken
	}
	rev, err := l.f.leases.Update(ctx, l.key, l.value(start), e.Revision())
	if err != nil {
		return err
	}
	l.rev = rev
	return nil
}

// renew extends the lease; errLeaseTaken if the key changed under us.
func (l *Lease) renew(ctx context.Context, start time.Time) error {
	rev, err := l.f.leases.Update(ctx, l.key, l.value(start), l.rev)
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || isWrongLastSeqErr(err) {
		return errLeaseTaken
	}
	if err != nil {
		return err
	}
	l.rev = rev
	return nil
}

func (l *Lease) gain() {
	l.held.Store(true)
	l.f.m.leaseHeld.WithLabelValues(l.name).Set(1)
	l.f.log.Info("m2mguard fleet_lease_gained", "event", "fleet_lease_gained", "lease", l.name)
	if l.o.OnGain != nil {
		l.o.OnGain()
	}
}

func (l *Lease) lose(reason string) {
	l.held.Store(false)
	l.f.m.leaseHeld.WithLabelValues(l.name).Set(0)
	l.f.log.Info("m2mguard fleet_lease_lost", "event", "fleet_lease_lost", "lease", l.name, "reason", reason)
	if l.o.OnLoss != nil {
		l.o.OnLoss()
	}
}

// release gives the lease up at Stop, so that another broker takes it at
// once rather than after TTL.
func (l *Lease) release() {
	if !l.held.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = l.f.leases.Delete(ctx, l.key, jetstream.LastRevision(l.rev))
	l.lose("released")
}

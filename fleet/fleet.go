package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Names of the JetStream assets the fleet shares. Every broker creates or
// updates them at Open with the same configuration.
const (
	ReplayBucket   = "M2MGUARD_REPLAY"   // replay claims: sn.nonce → claiming broker
	SessionBucket  = "M2MGUARD_SESSIONS" // session directory: ClientID → Entry
	BrokerBucket   = "M2MGUARD_BROKERS"  // liveness: broker id → heartbeat
	LeaseBucket    = "M2MGUARD_LEASES"   // leases: name → holder and expiry
	EventStream    = "M2MGUARD_EVENTS"   // events between brokers
	EventSubjects  = "m2mguard.evt.>"
	EventMaxAge    = 10 * time.Minute
	throttleSubj   = "m2mguard.thr"
	rpcSubjPrefix  = "m2mguard.rpc."
	sweepLeaseName = "directory-sweep"
)

// Fleet is one broker's connection to the shared security state of a fleet
// of brokers. It implements hook.ReplayGuard (Claim) and hands out the
// other parts: Throttler, Directory, Bus, Handle/Request/Gather and Lease.
// Its methods are safe for concurrent use. Close stops every goroutine it
// or its parts started and waits for them.
type Fleet struct {
	opts Options
	log  *slog.Logger
	nc   *nats.Conn
	js   jetstream.JetStream
	m    *metrics

	replay, sessions, brokers, leases jetstream.KeyValue
	replicas                          int

	avail   atomic.Bool // JetStream answered the last operation
	cutOff  atomic.Bool // disconnected or a heartbeat failed since the last heartbeat
	availMu sync.Mutex  // orders availability events

	sem chan struct{} // bounds the request handlers running at once
	thr *throttlePub
	dir *Directory
	bus *Bus

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine of the fleet and its parts

	mu      sync.Mutex
	closers []func() // leases, subscriptions, watches: stopped at Close
	closed  bool
}

// Open connects to NATS and creates (or binds) the fleet's buckets and
// stream. It waits until ctx ends while the cluster has no JetStream
// leader yet (brokers and embedded nodes starting together: an error
// wrapping ErrNotReady), asking every 250 ms, then creates every asset at
// once; an error wrapping ErrConfig means options that cannot work.
func Open(ctx context.Context, o Options) (*Fleet, error) {
	o, err := o.withDefaults()
	if err != nil {
		return nil, err
	}
	f := &Fleet{opts: o, log: o.Logger.With("broker_id", o.BrokerID)}
	f.m, err = newMetrics(o.Registerer)
	if err != nil {
		return nil, err
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	nopts, err := o.natsOptions([]nats.Option{
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			f.cutOff.Store(true)
			if f.ctx.Err() != nil {
				return // Close
			}
			f.log.Warn("m2mguard fleet_disconnected", "event", "fleet_disconnected", "error", err)
			f.setAvailable(false, "disconnected from NATS")
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			f.log.Info("m2mguard fleet_reconnected", "event", "fleet_reconnected", "server", nc.ConnectedServerName())
			f.m.reconnects.Inc()
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subj := ""
			if sub != nil {
				subj = sub.Subject
			}
			f.log.Warn("fleet: nats error", "subject", subj, "error", err)
		}),
	})
	if err != nil {
		f.cancel()
		return nil, err
	}
	f.nc, err = nats.Connect(strings.Join(o.URLs, ","), nopts...)
	if err != nil {
		f.cancel()
		return nil, fmt.Errorf("fleet: connect: %w", err)
	}
	f.js, err = jetstream.New(f.nc)
	if err != nil {
		f.nc.Close()
		f.cancel()
		return nil, fmt.Errorf("fleet: jetstream: %w", err)
	}
	if err := f.createAssets(ctx); err != nil {
		f.nc.Close()
		f.cancel()
		return nil, err
	}
	f.avail.Store(true)
	f.m.available.Set(1)
	// The buckets were created at once: the stream of one may not have
	// its subjects' interest on every node yet (no responders), for a
	// moment.
	if err := retry(ctx, f.beat); err != nil {
		f.nc.Close()
		f.cancel()
		return nil, fmt.Errorf("fleet: first heartbeat: %w", err)
	}
	f.sem = make(chan struct{}, maxConcurrentRPC)
	f.thr = newThrottlePub(f)
	f.dir = &Directory{f: f}
	f.bus = &Bus{f: f}
	f.goRun(f.heartbeat)
	if o.SweepEvery > 0 {
		l, err := f.Lease(sweepLeaseName, LeaseOptions{TTL: 3 * o.Heartbeat})
		if err != nil {
			_ = f.Close()
			return nil, err
		}
		f.goRun(func() { f.sweeper(l) })
	}
	f.log.Info("m2mguard fleet_open", "event", "fleet_open", "server", f.nc.ConnectedServerName(), "replicas", f.replicas)
	return f, nil
}

// BrokerID is this broker's id in the fleet.
func (f *Fleet) BrokerID() string { return f.opts.BrokerID }

// Replicas is the number of replicas of the fleet's buckets and stream.
func (f *Fleet) Replicas() int { return f.replicas }

// Available reports whether the last operation on JetStream succeeded (a
// claim, a heartbeat): false while the broker is cut off from NATS or the
// cluster has no leader. While false, claims fail (logins are refused with
// "server unavailable") and the throttle is local only.
func (f *Fleet) Available() bool { return f.avail.Load() }

// Conn is the NATS connection, for the integration's own subscriptions (its
// lifetime is the Fleet's: do not close it).
func (f *Fleet) Conn() *nats.Conn { return f.nc }

// KeyValue creates (or binds) a KV bucket of the integration's own, with
// the fleet's replicas and file storage, history 1 and values of at most 4
// KiB; ttl 0 keeps keys until they are deleted. It retries through a
// leader election until ctx ends (5 s without a deadline), with attempts
// that start short (as Open's: see createAsset).
func (f *Fleet) KeyValue(ctx context.Context, name, description string, ttl time.Duration) (jetstream.KeyValue, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opTimeout)
		defer cancel()
	}
	var kv jetstream.KeyValue
	err := createAsset(ctx, transient, func(ctx context.Context) (err error) {
		kv, err = f.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket: name, Description: description, History: 1, TTL: ttl,
			Storage: jetstream.FileStorage, Replicas: f.replicas, MaxValueSize: 4096,
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("fleet: bucket %s: %w", name, err)
	}
	return kv, nil
}

// setAvailable records the availability and logs a state change once,
// with its reason: fleet_unavailable (warning) or fleet_available.
func (f *Fleet) setAvailable(ok bool, reason string) {
	if f.avail.Load() == ok {
		return
	}
	f.availMu.Lock()
	defer f.availMu.Unlock()
	if f.avail.Swap(ok) == ok {
		return
	}
	if ok {
		f.m.available.Set(1)
		f.log.Info("m2mguard fleet_available", "event", "fleet_available")
		return
	}
	f.m.available.Set(0)
	f.m.unavailable.Inc()
	f.log.Warn("m2mguard fleet_unavailable", "event", "fleet_unavailable", "reason", reason)
}

// createAssets creates or updates the buckets and the stream, retrying
// until ctx ends while JetStream has no leader or cannot place the
// replicas yet (a cluster whose nodes are still starting). With Replicas
// 0 it asks for 3, or 1 from a server that is not clustered.
//
// It first waits until JetStream answers (waitJetStream), then creates
// the assets at once, each with attempts that start short (createAsset):
// JetStream answers nothing to a request it cannot serve yet, and a start
// that waited out a long attempt for each silence took seconds more than
// the cluster needed.
func (f *Fleet) createAssets(ctx context.Context) error {
	replicas := f.opts.Replicas
	if replicas == 0 {
		replicas = 3
	}
	if err := f.waitJetStream(ctx); err != nil {
		return fmt.Errorf("fleet: create jetstream assets with %d replicas: %w", replicas, err)
	}
	for {
		err := f.createAssetsWith(ctx, replicas)
		if err == nil {
			f.replicas = replicas
			return nil
		}
		if apiCode(err) == codeReplicasNotSupported && f.opts.Replicas == 0 {
			replicas = 1 // a single server without a cluster
			continue
		}
		return fmt.Errorf("fleet: create jetstream assets with %d replicas: %w (%w)", replicas, err, ctx.Err())
	}
}

// codeReplicasNotSupported is JetStream's answer to replicas from a
// server without a cluster.
const codeReplicasNotSupported jetstream.ErrorCode = 10074

// apiCode is the JetStream error code of err, 0 if it has none.
func apiCode(err error) jetstream.ErrorCode {
	var api *jetstream.APIError
	if errors.As(err, &api) {
		return api.ErrorCode
	}
	return 0
}

// createAssetsWith creates or updates every asset, all at once, each
// through createAsset. It returns when all are done, or with the first
// error (the others are stopped): ctx's end, or replicas that a server
// without a cluster does not support.
func (f *Fleet) createAssetsWith(ctx context.Context, replicas int) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	kvs := []struct {
		cfg jetstream.KeyValueConfig
		to  *jetstream.KeyValue
	}{
		{jetstream.KeyValueConfig{Bucket: ReplayBucket, Description: "m2mguard replay claims", TTL: f.claimTTL()}, &f.replay},
		{jetstream.KeyValueConfig{Bucket: SessionBucket, Description: "m2mguard session directory"}, &f.sessions},
		{jetstream.KeyValueConfig{Bucket: BrokerBucket, Description: "m2mguard broker liveness", TTL: 3 * f.opts.Heartbeat}, &f.brokers},
		{jetstream.KeyValueConfig{Bucket: LeaseBucket, Description: "m2mguard leases"}, &f.leases},
	}
	errs := make(chan error, len(kvs)+1)
	var wg sync.WaitGroup
	for _, kv := range kvs {
		kv.cfg.History, kv.cfg.Storage, kv.cfg.Replicas, kv.cfg.MaxValueSize = 1, jetstream.FileStorage, replicas, 4096
		wg.Go(func() {
			err := createAsset(ctx, placeable, func(ctx context.Context) (err error) {
				*kv.to, err = f.js.CreateOrUpdateKeyValue(ctx, kv.cfg)
				return err
			})
			if err != nil {
				err = fmt.Errorf("fleet: bucket %s: %w", kv.cfg.Bucket, err)
			}
			errs <- err
		})
	}
	wg.Go(func() {
		err := createAsset(ctx, placeable, func(ctx context.Context) error {
			_, err := f.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
				Name: EventStream, Description: "m2mguard events between brokers", Subjects: []string{EventSubjects},
				Storage: jetstream.FileStorage, Replicas: replicas, MaxAge: EventMaxAge,
				MaxMsgSize: maxEventSize, Discard: jetstream.DiscardOld, Duplicates: time.Minute,
			})
			return err
		})
		if err != nil {
			err = fmt.Errorf("fleet: stream %s: %w", EventStream, err)
		}
		errs <- err
	})
	var first error
	for range len(kvs) + 1 {
		if err := <-errs; err != nil && first == nil {
			first = err
			cancel() // the others end too: the caller retries or gives up
		}
	}
	wg.Wait()
	return first
}

// createAsset runs create (a create or update of a bucket or stream)
// until it succeeds, fails with an error that retryable refuses, or ctx
// ends.
//
// Its first attempt waits firstAssetAttempt for the answer, each next one
// twice as long up to assetTimeout. JetStream answers an update of a
// stream only from the stream's leader: while brokers start together, the
// update that follows another broker's create of the same asset (Create
// OrUpdate is an update first) reaches a Raft group still electing its
// first leader, and is never answered. Its retry, sent a moment later, is
// (in milliseconds); a slow link still gets the longer attempts.
func createAsset(ctx context.Context, retryable func(error) bool, create func(ctx context.Context) error) error {
	attempt, pause := firstAssetAttempt, 20*time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, attempt)
		err := create(actx)
		waited := actx.Err() != nil // the attempt's time ran out
		cancel()
		if err == nil || !retryable(err) || ctx.Err() != nil {
			return err
		}
		if waited {
			attempt = min(2*attempt, assetTimeout) // it waited: no pause
			continue
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(pause):
		}
		pause = min(2*pause, 250*time.Millisecond)
	}
}

// placeable reports an error that Open retries at an asset: any but
// replicas that a server without a cluster refuses (a cluster whose nodes
// are still starting cannot place the replicas yet, and says so).
func placeable(err error) bool { return apiCode(err) != codeReplicasNotSupported }

// waitJetStream waits until JetStream answers an account info request,
// or ctx ends (an error wrapping ErrNotReady). In a cluster only the meta leader answers it, and a
// request sent while there is none (nodes starting together, an election)
// gets no answer at all: a new request goes out every firstAssetAttempt,
// without dropping those in flight (each waits up to assetTimeout), so
// the wait ends within a moment of the leader's election, and over a
// slow link too.
func (f *Fleet) waitJetStream(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // before wg.Wait: the requests in flight end
	answers := make(chan error)
	ask := func() {
		wg.Go(func() {
			actx, acancel := context.WithTimeout(ctx, assetTimeout)
			defer acancel()
			_, err := f.js.AccountInfo(actx)
			select {
			case answers <- err:
			case <-ctx.Done():
			}
		})
	}
	t := time.NewTicker(firstAssetAttempt)
	defer t.Stop()
	ask()
	var last error
	for {
		select {
		case err := <-answers:
			if err == nil {
				return nil
			}
			last = err
		case <-t.C:
			ask()
		case <-ctx.Done():
			if last == nil {
				return fmt.Errorf("%w: %w", ErrNotReady, ctx.Err())
			}
			return fmt.Errorf("%w: %w (%w)", ErrNotReady, last, ctx.Err())
		}
	}
}

// assetTimeout bounds one request that creates or updates an asset, or
// asks whether JetStream answers; firstAssetAttempt is the first attempt
// at an asset, and how often waitJetStream asks.
const (
	assetTimeout      = 2 * time.Second
	firstAssetAttempt = 250 * time.Millisecond
)

// goRun runs fn in a goroutine that Close waits for; fn must return when
// f.ctx ends.
func (f *Fleet) goRun(fn func()) {
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		fn()
	}()
}

// addCloser registers a stop function for Close; false if closed already.
func (f *Fleet) addCloser(fn func()) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.closers = append(f.closers, fn)
	return true
}

// Close stops the fleet's leases (releasing them), subscriptions, watches
// and handlers, removes the broker's liveness key, flushes what it
// publishes and closes the connection; it waits for every goroutine. The
// broker's directory entries stay (the integration unregisters its
// sessions as they end; a dead broker's are swept).
func (f *Fleet) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	closers := f.closers
	f.closers = nil
	f.mu.Unlock()
	for i := len(closers) - 1; i >= 0; i-- {
		closers[i]()
	}
	if f.thr != nil {
		f.thr.stop()
	}
	f.cancel()
	f.wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if key, err := EscapeKey(f.opts.BrokerID); err == nil && f.brokers != nil {
		_ = f.brokers.Delete(ctx, key)
	}
	err := f.nc.FlushWithContext(ctx)
	f.nc.Close()
	if err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		return fmt.Errorf("fleet: close: %w", err)
	}
	return nil
}

// heartbeat renews the broker's liveness key every Heartbeat; it also
// tells the fleet whether JetStream answers.
func (f *Fleet) heartbeat() {
	t := time.NewTicker(f.opts.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-f.ctx.Done():
			return
		case <-t.C:
		}
		// A slow answer is not yet a lost fleet: the beat may take twice
		// the interval (at least a second) before it counts as failed.
		ctx, cancel := context.WithTimeout(f.ctx, max(2*f.opts.Heartbeat, time.Second))
		err := f.beat(ctx)
		cancel()
		if err != nil {
			if f.ctx.Err() == nil {
				f.cutOff.Store(true)
				f.setAvailable(false, "heartbeat: "+err.Error())
			}
			continue
		}
		f.setAvailable(true, "")
		if f.cutOff.Swap(false) {
			// Changes may have been missed, and the broker's sessions
			// swept as gone if it was away long: watches start again.
			f.dir.resync()
		}
	}
}

func (f *Fleet) beat(ctx context.Context) error {
	key, err := EscapeKey(f.opts.BrokerID)
	if err != nil {
		return err
	}
	_, err = f.brokers.Put(ctx, key, []byte(time.Now().UTC().Format(time.RFC3339Nano)))
	return err
}

// Brokers returns the ids of the live brokers (those whose liveness key is
// fresh), this one included, sorted.
func (f *Fleet) Brokers(ctx context.Context) ([]string, error) {
	lister, err := f.brokers.ListKeys(ctx)
	if err != nil {
		if errors.Is(err, jetstream.ErrNoKeysFound) {
			return nil, nil
		}
		return nil, fmt.Errorf("fleet: list brokers: %w", err)
	}
	defer lister.Stop()
	var ids []string
	for k := range lister.Keys() {
		if id, err := UnescapeKey(k); err == nil {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids, nil
}

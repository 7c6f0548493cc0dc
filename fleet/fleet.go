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
// stream. It retries until ctx ends while the cluster has no JetStream
// leader yet (brokers and embedded nodes starting together); an error
// wrapping ErrConfig means options that cannot work.
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
	if err := f.beat(ctx); err != nil {
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
// leader election until ctx ends (5 s without a deadline).
func (f *Fleet) KeyValue(ctx context.Context, name, description string, ttl time.Duration) (jetstream.KeyValue, error) {
	var kv jetstream.KeyValue
	err := retry(ctx, func(ctx context.Context) (err error) {
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
func (f *Fleet) createAssets(ctx context.Context) error {
	replicas := f.opts.Replicas
	if replicas == 0 {
		replicas = 3
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
		select {
		case <-ctx.Done():
			return fmt.Errorf("fleet: create jetstream assets with %d replicas: %w (%w)", replicas, err, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
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

// createAssetsWith creates or updates every asset, each request bounded
// by assetTimeout: when brokers start together, JetStream may drop the
// answer to one of several identical creates, and a short attempt gets
// it (or "exists, updated") at the next.
func (f *Fleet) createAssetsWith(ctx context.Context, replicas int) error {
	var err error
	kv := func(name, desc string, maxAge time.Duration) jetstream.KeyValue {
		if err != nil {
			return nil
		}
		cctx, cancel := context.WithTimeout(ctx, assetTimeout)
		defer cancel()
		var b jetstream.KeyValue
		b, err = f.js.CreateOrUpdateKeyValue(cctx, jetstream.KeyValueConfig{
			Bucket: name, Description: desc, History: 1, TTL: maxAge,
			Storage: jetstream.FileStorage, Replicas: replicas, MaxValueSize: 4096,
		})
		if err != nil {
			err = fmt.Errorf("fleet: bucket %s: %w", name, err)
		}
		return b
	}
	f.replay = kv(ReplayBucket, "m2mguard replay claims", f.claimTTL())
	f.sessions = kv(SessionBucket, "m2mguard session directory", 0)
	f.brokers = kv(BrokerBucket, "m2mguard broker liveness", 3*f.opts.Heartbeat)
	f.leases = kv(LeaseBucket, "m2mguard leases", 0)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, assetTimeout)
	defer cancel()
	_, err = f.js.CreateOrUpdateStream(cctx, jetstream.StreamConfig{
		Name: EventStream, Description: "m2mguard events between brokers", Subjects: []string{EventSubjects},
		Storage: jetstream.FileStorage, Replicas: replicas, MaxAge: EventMaxAge,
		MaxMsgSize: maxEventSize, Discard: jetstream.DiscardOld, Duplicates: time.Minute,
	})
	if err != nil {
		return fmt.Errorf("fleet: stream %s: %w", EventStream, err)
	}
	return nil
}

// assetTimeout bounds one request that creates or updates an asset.
const assetTimeout = 2 * time.Second

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

package fleetlink

import (
	"context"
	"hash/maphash"
	"sync"
	"time"

	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/hook"
)

// directory is the hook's SessionDirectory on the fleet's: it registers
// this broker's sessions (in order per ClientID, on a few workers, so that
// the login path never waits for NATS) and ends the ones a newer login on
// another broker took over.
//
// Takeover is decided by epochs (the KV revision of each registration):
// a registration by another broker with a larger epoch than this broker's
// session ends the session here. A session still waiting for its own
// registration when another broker's arrives compares the establishment
// times instead (the Since of each): the later login keeps the ClientID.
type directory struct {
	l    *Link
	seed maphash.Seed

	mu     sync.Mutex
	local  map[string]*localSession // ClientID → this broker's latest session of it
	resync map[string]uint64        // during a resync: ClientIDs registered by this broker → epoch

	shards [dirShards]*queue[dirOp]

	synced     chan struct{} // closed at the end of the first resync
	syncedOnce sync.Once
}

// dirShards is the number of directory workers: registrations of
// different ClientIDs go out in parallel, those of one ClientID in order.
const dirShards = 8

// localSession is what the directory knows of one session of this broker.
type localSession struct {
	ref   hook.SessionRef
	info  hook.SessionInfo
	epoch uint64 // its registration's; 0 until registered
	// A registration of the ClientID by another broker, seen before this
	// session was registered: the worker compares before registering.
	foreignEpoch uint64
	foreignSince time.Time
	ended        bool // SessionEnded was called
	takenOver    bool // the hook was asked to end it
	failed       bool // its registration failed: the next resync registers it
}

// dirOp is a registration (start) or removal of a session.
type dirOp struct {
	start bool
	ref   hook.SessionRef
}

func newDirectory(l *Link) *directory {
	d := &directory{l: l, seed: maphash.MakeSeed(), local: map[string]*localSession{}, synced: make(chan struct{})}
	for i := range d.shards {
		d.shards[i] = newQueue[dirOp]()
	}
	l.m.pendingFn = func() float64 {
		n := 0
		for _, q := range d.shards {
			n += q.len()
		}
		return float64(n)
	}
	return d
}

func (d *directory) shard(clientID string) *queue[dirOp] {
	return d.shards[maphash.String(d.seed, clientID)%dirShards]
}

// SessionStarted queues the registration of a session (hook.SessionDirectory).
func (d *directory) SessionStarted(ref hook.SessionRef, info hook.SessionInfo) {
	d.mu.Lock()
	d.local[ref.ClientID] = &localSession{ref: ref, info: info}
	d.mu.Unlock()
	d.shard(ref.ClientID).push(dirOp{start: true, ref: ref})
}

// SessionEnded queues the removal of a session (hook.SessionDirectory).
func (d *directory) SessionEnded(ref hook.SessionRef) {
	d.mu.Lock()
	if ls := d.local[ref.ClientID]; ls != nil && ls.ref == ref {
		ls.ended = true
	}
	d.mu.Unlock()
	d.shard(ref.ClientID).push(dirOp{ref: ref})
}

// start runs the workers and the watch (Attach).
func (d *directory) start() error {
	for _, q := range d.shards {
		epochs := map[hook.SessionRef]uint64{} // only this worker touches it
		d.l.goRun(func() {
			q.run(d.l.ctx, func(op dirOp) {
				if op.start {
					d.register(op.ref, epochs)
				} else {
					d.unregister(op.ref, epochs)
				}
			})
		})
	}
	stop, err := d.l.f.Directory().Watch(d.changed)
	if err != nil {
		return err
	}
	d.l.addStop(stop)
	return nil
}

// drain waits until every queued operation is written, or timeout (Close).
func (d *directory) drain(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for _, q := range d.shards {
		q.waitEmpty(time.Until(deadline))
	}
}

// opCtx bounds one directory write: through a leader election, not
// forever.
func (d *directory) opCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(d.l.ctx, 5*time.Second)
}

// register writes the session's entry, unless it ended or a later login
// elsewhere came first, and ends it if a later login elsewhere registered
// meanwhile.
func (d *directory) register(ref hook.SessionRef, epochs map[hook.SessionRef]uint64) {
	d.mu.Lock()
	ls := d.local[ref.ClientID]
	if ls == nil || ls.ref != ref || ls.ended || ls.takenOver {
		d.mu.Unlock()
		return
	}
	if !ls.foreignSince.IsZero() && ls.foreignSince.After(ls.info.Since) {
		ls.takenOver = true
		d.mu.Unlock()
		d.takeOver(ref)
		return
	}
	info := ls.info
	d.mu.Unlock()

	ctx, cancel := d.opCtx()
	epoch, err := d.l.f.Directory().Register(ctx, entryOf(info))
	cancel()
	if err != nil {
		d.mu.Lock()
		if ls := d.local[ref.ClientID]; ls != nil && ls.ref == ref {
			ls.failed = true
		}
		d.mu.Unlock()
		d.l.m.failures.WithLabelValues("register").Inc()
		if d.l.ctx.Err() == nil {
			d.l.log.Warn("fleet: session not registered (it is registered again after the next resync)", "client_id", ref.ClientID, "error", err)
		}
		return
	}
	epochs[ref] = epoch
	d.mu.Lock()
	ls = d.local[ref.ClientID]
	current := ls != nil && ls.ref == ref
	superseded := current && !ls.takenOver && ls.foreignEpoch > epoch
	if current {
		ls.epoch, ls.failed = epoch, false
		ls.takenOver = ls.takenOver || superseded
	}
	d.mu.Unlock()
	if superseded {
		d.takeOver(ref)
	}
}

// unregister removes the session's entry, if it is still the one it
// registered.
func (d *directory) unregister(ref hook.SessionRef, epochs map[hook.SessionRef]uint64) {
	epoch := epochs[ref]
	delete(epochs, ref)
	d.mu.Lock()
	if ls := d.local[ref.ClientID]; ls != nil && ls.ref == ref {
		delete(d.local, ref.ClientID)
	}
	d.mu.Unlock()
	if epoch == 0 {
		return
	}
	ctx, cancel := d.opCtx()
	_, err := d.l.f.Directory().Unregister(ctx, ref.ClientID, epoch)
	cancel()
	if err != nil {
		d.l.m.failures.WithLabelValues("unregister").Inc()
		if d.l.ctx.Err() == nil {
			d.l.log.Warn("fleet: session not removed from the directory (the directory sweep removes it when this broker is gone)", "client_id", ref.ClientID, "error", err)
		}
	}
}

// changed handles one change of the fleet's directory, on the watch's
// goroutine.
func (d *directory) changed(c fleet.Change) {
	switch {
	case c.Resync:
		// Started, or back after a cut-off: invalidations may have been
		// missed, and this broker's entries swept.
		d.l.svc.InvalidateAll()
		d.mu.Lock()
		d.resync = map[string]uint64{}
		d.mu.Unlock()
	case c.Current:
		d.resynced()
		d.syncedOnce.Do(func() { close(d.synced) })
	case c.Deleted:
		d.deleted(c)
	case c.Entry.Broker == d.l.id:
		d.mu.Lock()
		if d.resync != nil {
			d.resync[c.ClientID] = c.Epoch
		}
		d.mu.Unlock()
	default:
		d.foreign(c)
	}
}

// foreign handles a registration by another broker.
func (d *directory) foreign(c fleet.Change) {
	d.mu.Lock()
	ls := d.local[c.ClientID]
	var end bool
	switch {
	case ls == nil:
	case ls.ended || ls.takenOver:
	case ls.epoch != 0:
		end = ls.epoch < c.Epoch
		ls.takenOver = end
	default: // not registered yet: the worker decides
		ls.foreignEpoch = max(ls.foreignEpoch, c.Epoch)
		if c.Entry.Since.After(ls.foreignSince) {
			ls.foreignSince = c.Entry.Since
		}
	}
	var ref hook.SessionRef
	if ls != nil {
		ref = ls.ref
	}
	d.mu.Unlock()
	switch {
	case ls == nil:
		// No live session here, but perhaps an MQTT session kept for the
		// ClientID: it lives on the other broker now.
		if d.l.hook.TakenOver(hook.SessionRef{ClientID: c.ClientID}) {
			d.l.log.Debug("fleet: offline session discarded: the client logged in on another broker", "client_id", c.ClientID, "broker", c.Entry.Broker)
		}
	case end:
		d.takeOver(ref)
	}
}

// takeOver has the hook end a session that a newer login elsewhere took
// over, in a goroutine of its own (the hook waits for the DISCONNECT up
// to its DisconnectTimeout).
func (d *directory) takeOver(ref hook.SessionRef) {
	d.l.goRun(func() {
		if d.l.hook.TakenOver(ref) {
			d.l.m.takeovers.Inc()
		}
	})
}

// deleted handles the removal of an entry: a sweep (this broker was taken
// for gone) may have removed one of this broker's live sessions, which is
// registered again.
func (d *directory) deleted(c fleet.Change) {
	d.mu.Lock()
	ls := d.local[c.ClientID]
	again := ls != nil && !ls.ended && !ls.takenOver && ls.epoch != 0 && ls.epoch < c.Epoch
	var ref hook.SessionRef
	if again {
		ref, ls.epoch = ls.ref, 0
	}
	d.mu.Unlock()
	if again {
		d.shard(ref.ClientID).push(dirOp{start: true, ref: ref})
	}
}

// resynced runs at the end of a resync's entries: this broker's live
// sessions missing from the directory are registered again, and entries
// naming this broker without a session here (left by an earlier run of
// it) are removed.
func (d *directory) resynced() {
	d.mu.Lock()
	seen := d.resync
	d.resync = nil
	var missing []hook.SessionRef
	stale := map[string]uint64{}
	for id, epoch := range seen {
		if d.local[id] == nil {
			stale[id] = epoch
		}
	}
	for id, ls := range d.local {
		switch {
		case ls.ended || ls.takenOver:
		case ls.failed, ls.epoch != 0 && seen[id] != ls.epoch:
			// Its registration failed, or was swept while this broker
			// was cut off. (One not yet registered is still queued.)
			ls.epoch, ls.failed = 0, false
			missing = append(missing, ls.ref)
		}
	}
	d.mu.Unlock()
	for _, ref := range missing {
		d.shard(ref.ClientID).push(dirOp{start: true, ref: ref})
	}
	if len(stale) > 0 {
		d.l.goRun(func() {
			for id, epoch := range stale {
				ctx, cancel := d.opCtx()
				_, _ = d.l.f.Directory().Unregister(ctx, id, epoch)
				cancel()
			}
		})
	}
	if len(missing)+len(stale) > 0 {
		d.l.log.Info("m2mguard fleet_directory_resynced", "event", "fleet_directory_resynced", "registered", len(missing), "removed", len(stale))
	}
}

// entryOf is the directory entry of a session.
func entryOf(info hook.SessionInfo) fleet.Entry {
	e := fleet.Entry{ClientID: info.ClientID, Kind: fleet.KindTerminal, SN: info.SN, App: info.App,
		Remote: info.Remote, Protocol: info.Protocol, Since: info.Since}
	if info.SN == "" {
		e.Kind = fleet.KindApp
	}
	return e
}

// queue is an unbounded FIFO of one worker: push never blocks (the login
// path pushes), the worker takes everything queued at once.
type queue[T any] struct {
	mu      sync.Mutex
	items   []T
	busy    bool // the worker holds a batch
	wake    chan struct{}
	emptied *sync.Cond
}

func newQueue[T any]() *queue[T] {
	q := &queue[T]{wake: make(chan struct{}, 1)}
	q.emptied = sync.NewCond(&q.mu)
	return q
}

func (q *queue[T]) push(v T) {
	q.mu.Lock()
	q.items = append(q.items, v)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *queue[T]) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items)
}

// run hands every item to fn, in order, until ctx ends.
func (q *queue[T]) run(ctx context.Context, fn func(T)) {
	for {
		q.mu.Lock()
		batch := q.items
		q.items = nil
		q.busy = len(batch) > 0
		if !q.busy {
			q.emptied.Broadcast()
		}
		q.mu.Unlock()
		for _, v := range batch {
			fn(v)
		}
		if len(batch) > 0 {
			continue
		}
		select {
		case <-ctx.Done():
			q.mu.Lock()
			q.busy = false
			q.emptied.Broadcast()
			q.mu.Unlock()
			return
		case <-q.wake:
		}
	}
}

// waitEmpty waits until the queue is empty and its worker idle, or timeout.
func (q *queue[T]) waitEmpty(timeout time.Duration) {
	if timeout <= 0 {
		return
	}
	timer := time.AfterFunc(timeout, func() {
		q.mu.Lock()
		q.emptied.Broadcast()
		q.mu.Unlock()
	})
	defer timer.Stop()
	deadline := time.Now().Add(timeout)
	q.mu.Lock()
	defer q.mu.Unlock()
	for (len(q.items) > 0 || q.busy) && time.Now().Before(deadline) {
		q.emptied.Wait()
	}
}

// DiscardMoved discards the offline sessions among clientIDs (the
// sessions this broker restored from its session store at start) whose
// ClientID the fleet's directory shows on another broker: the client
// logged in there while this broker was down, and its session lives there
// now. The broker calls it once its MQTT server has restored them; the
// directory's own changes cover what happens after. It returns how many
// it discarded. While the directory is unreachable it discards nothing
// (a later login elsewhere discards them then).
func (l *Link) DiscardMoved(ctx context.Context, clientIDs []string) int {
	n := 0
	for _, id := range clientIDs {
		lctx, cancel := context.WithTimeout(ctx, lookupTimeout)
		e, ok, err := l.f.Directory().Lookup(lctx, id)
		cancel()
		if err != nil {
			l.m.failures.WithLabelValues("lookup").Inc()
			l.log.Warn("fleet: restored sessions not checked against the directory", "error", err)
			return n
		}
		if ok && e.Broker != l.id && l.hook.TakenOver(hook.SessionRef{ClientID: id}) {
			n++
		}
	}
	if n > 0 {
		l.log.Info("fleet: restored sessions discarded: their clients logged in on other brokers meanwhile", "count", n)
	}
	return n
}

// WaitSynced waits until the link has read the fleet's directory once
// after Attach (the start's resync, which drops every cached record of
// the key service), or ctx ends. A caller that warms the key service's
// cache does it after.
func (l *Link) WaitSynced(ctx context.Context) error {
	select {
	case <-l.dir.synced:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

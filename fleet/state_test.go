package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m2mguard/m2mguard/hook"
)

// TestThrottleShared: failures of one (identity, address) pair count on
// every broker: three failures on A and two on B block the pair on C (Free
// = 5), and a success on C clears it everywhere. A broker's own messages
// are not applied twice.
func TestThrottleShared(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	fs := []*Fleet{c.open("a", 0, nil), c.open("b", 1, nil), c.open("c", 2, nil)}
	opts := hook.ThrottleOptions{Free: 5, Base: time.Minute}
	th := make([]hook.Throttler, 3)
	for i, f := range fs {
		th[i] = f.Throttler(hook.NewThrottleTable(opts))
	}
	const id, addr = testSN, "203.0.113.7"
	now := time.Now()
	for range 3 {
		th[0].Fail(id, addr, now)
	}
	for range 2 {
		th[1].Fail(id, addr, now)
	}
	for i := range th {
		checkFor(t, 5*time.Second, 10*time.Millisecond, func() error {
			if !th[i].Blocked(id, addr, time.Now()) {
				return fmt.Errorf("broker %s does not block the pair after 5 failures in the fleet", fs[i].BrokerID())
			}
			return nil
		})
	}
	if th[2].Blocked(id, "198.51.100.1", time.Now()) {
		t.Fatal("another address is blocked")
	}
	th[2].Succeed(id, addr)
	for i := range th {
		checkFor(t, 5*time.Second, 10*time.Millisecond, func() error {
			if th[i].Blocked(id, addr, time.Now()) {
				return fmt.Errorf("broker %s still blocks the pair after a success", fs[i].BrokerID())
			}
			return nil
		})
	}
	// One failure on A: A counts it once (not again from the bus), so four
	// more on A are needed before A blocks.
	applied := testutil.ToFloat64(fs[2].m.throttleApply)
	th[0].Fail(id, "192.0.2.1", now)
	checkFor(t, 5*time.Second, 10*time.Millisecond, func() error {
		if testutil.ToFloat64(fs[2].m.throttleApply) < applied+1 {
			return errors.New("C did not apply A's failure")
		}
		return nil
	})
	for range 3 {
		th[0].Fail(id, "192.0.2.1", now)
	}
	if th[0].Blocked(id, "192.0.2.1", time.Now()) {
		t.Fatal("A applied its own failures twice")
	}
}

// TestThrottleLocalWhenCutOff: without NATS the shared throttle still
// counts locally (no worse than one broker) and never blocks the caller.
func TestThrottleLocalWhenCutOff(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	f := c.open("a", 0, nil)
	th := f.Throttler(hook.NewThrottleTable(hook.ThrottleOptions{Free: 2, Base: time.Minute}))
	c.stop(0)
	now := time.Now()
	for range 10000 { // more than the queue holds: never blocks
		th.Fail(testSN, "203.0.113.9", now)
	}
	if !th.Blocked(testSN, "203.0.113.9", time.Now()) {
		t.Fatal("the local table does not block")
	}
}

// TestDirectoryEpochsAndTakeover: a login of the same ClientID on B
// registers a newer epoch; A's watch sees it (the takeover signal); A's
// late Unregister of its old epoch does not undo B's; B's does.
func TestDirectoryEpochsAndTakeover(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	a, b := c.open("a", 0, nil), c.open("b", 1, nil)
	ctx := context.Background()
	var mu sync.Mutex
	var seen []Change
	stop, err := a.Directory().Watch(func(ch Change) {
		mu.Lock()
		seen = append(seen, ch)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	e1, err := a.Directory().Register(ctx, Entry{ClientID: testSN, Kind: KindTerminal, SN: testSN, Remote: "203.0.113.7:4711", Protocol: 5, Since: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	e2, err := b.Directory().Register(ctx, Entry{ClientID: testSN, Kind: KindTerminal, SN: testSN, Remote: "203.0.113.8:4712", Protocol: 4, Since: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if e2 <= e1 {
		t.Fatalf("epochs %d then %d: not increasing", e1, e2)
	}
	checkFor(t, 5*time.Second, 10*time.Millisecond, func() error {
		mu.Lock()
		defer mu.Unlock()
		for _, ch := range seen {
			if ch.ClientID == testSN && ch.Entry.Broker == "b" && ch.Epoch == e2 {
				return nil
			}
		}
		return fmt.Errorf("A's watch did not see B's registration: %+v", seen)
	})
	if ok, err := a.Directory().Unregister(ctx, testSN, e1); ok || err != nil {
		t.Fatalf("A's unregister of the old epoch: %v %v, want false", ok, err)
	}
	// A's lookup may lag B's write for a moment: JetStream answers a KV
	// read from any replica (Directory.Lookup).
	checkFor(t, 5*time.Second, 10*time.Millisecond, func() error {
		got, ok, err := a.Directory().Lookup(ctx, testSN)
		if err != nil || !ok || got.Broker != "b" || got.Epoch != e2 || got.Remote != "203.0.113.8:4712" || got.Kind != KindTerminal {
			return fmt.Errorf("lookup: %+v %v %v", got, ok, err)
		}
		return nil
	})
	if ok, err := b.Directory().Unregister(ctx, testSN, e2); !ok || err != nil {
		t.Fatalf("B's unregister: %v %v", ok, err)
	}
	checkFor(t, 5*time.Second, 10*time.Millisecond, func() error {
		if _, ok, err := a.Directory().Lookup(ctx, testSN); ok || err != nil {
			return fmt.Errorf("lookup after unregister: %v %v", ok, err)
		}
		return nil
	})
	checkFor(t, 5*time.Second, 10*time.Millisecond, func() error {
		mu.Lock()
		defer mu.Unlock()
		if l := seen[len(seen)-1]; !l.Deleted || l.ClientID != testSN {
			return fmt.Errorf("last change %+v, want the deletion", l)
		}
		return nil
	})
	mu.Lock()
	if !seen[0].Resync || !slices.ContainsFunc(seen, func(c Change) bool { return c.Current }) {
		t.Errorf("the watch did not start with a resync and end its initial entries with a current: %+v", seen)
	}
	// In order between resyncs (a slow heartbeat under load may restart
	// the watch, which then replays the current entries).
	var epochs []uint64
	for _, ch := range seen[1:] {
		if ch.Resync {
			epochs = nil
			continue
		}
		if ch.Current {
			continue
		}
		if len(epochs) > 0 && ch.Epoch <= epochs[len(epochs)-1] {
			t.Errorf("changes out of order: %v then %d", epochs, ch.Epoch)
		}
		epochs = append(epochs, ch.Epoch)
	}
	mu.Unlock()
	// An application's odd ClientID round-trips through the key escaping.
	odd := "dash-1/α.β *>"
	if _, err := a.Directory().Register(ctx, Entry{ClientID: odd, Kind: KindApp, App: "dash"}); err != nil {
		t.Fatal(err)
	}
	list, err := b.Directory().List(ctx)
	if err != nil || len(list) != 1 || list[0].ClientID != odd || list[0].App != "dash" {
		t.Fatalf("list: %+v %v", list, err)
	}
}

// TestDirectorySweepDeadBroker: the sessions of a broker that stops
// renewing its liveness key are removed by the holder of the sweep lease;
// those of live brokers stay.
func TestDirectorySweepDeadBroker(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	// Each sweep must finish within SweepEvery: 200 ms was too short for
	// a sweep on a loaded machine, with clusters of other tests running.
	sweepy := func(o *Options) { o.SweepEvery = time.Second }
	a, b := c.open("a", 0, sweepy), c.open("b", 1, sweepy)
	dead := c.open("dead", 2, nil)
	ctx := context.Background()
	for i, f := range []*Fleet{a, b, dead} {
		for j := range 3 {
			id := fmt.Sprintf("S%d%d", i, j)
			if _, err := f.Directory().Register(ctx, Entry{ClientID: id, Kind: KindTerminal, SN: id}); err != nil {
				t.Fatal(err)
			}
		}
	}
	dead.crash()
	checkFor(t, 15*time.Second, 100*time.Millisecond, func() error {
		list, err := a.Directory().List(ctx)
		if err != nil {
			return err
		}
		for _, e := range list {
			if e.Broker == "dead" {
				return fmt.Errorf("session %s of the dead broker still listed", e.ClientID)
			}
		}
		if len(list) != 6 {
			return fmt.Errorf("%d sessions, want the 6 of the live brokers", len(list))
		}
		return nil
	})
}

// crash stops the fleet's goroutines without its clean-up, as a killed
// broker would: its liveness key and directory entries stay behind.
func (f *Fleet) crash() {
	f.mu.Lock()
	f.closed = true
	closers := f.closers
	f.closers = nil
	f.mu.Unlock()
	f.nc.Close() // first: a lease cannot release, nothing is deleted
	for _, fn := range closers {
		fn()
	}
	if f.thr != nil {
		f.thr.stop()
	}
	f.cancel()
	f.wg.Wait()
}

// TestBusDelivery: an event published on A reaches every subscriber, A's
// own included, in order, with its origin; an event published while C is
// cut off from NATS reaches C when it is back; events lost from the stream
// meanwhile give C a resync.
func TestBusDelivery(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	a, b := c.open("a", 0, nil), c.open("b", 1, nil)
	cc := c.open("c", 2, func(o *Options) { // node 3 only
		o.URLs = []string{c.url(2)}
		o.natsExtra = []nats.Option{nats.IgnoreDiscoveredServers()}
	})
	type box struct {
		mu sync.Mutex
		ev []Event
	}
	boxes := make([]*box, 3)
	for i, f := range []*Fleet{a, b, cc} {
		bx := &box{}
		boxes[i] = bx
		if _, err := f.Bus().Subscribe(func(e Event) {
			bx.mu.Lock()
			bx.ev = append(bx.ev, e)
			bx.mu.Unlock()
		}); err != nil {
			t.Fatal(err)
		}
	}
	got := func(i int) []Event {
		boxes[i].mu.Lock()
		defer boxes[i].mu.Unlock()
		return slices.Clone(boxes[i].ev)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // publishes retry through elections
	defer cancel()
	for n := range 3 {
		if err := a.Bus().Publish(ctx, Event{Kind: EventRevoke, SN: testSN, Reason: fmt.Sprint("disabled ", n)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 3 {
		checkFor(t, 5*time.Second, 10*time.Millisecond, func() error {
			ev := got(i)
			if len(ev) != 3 {
				return fmt.Errorf("subscriber %d has %d events", i, len(ev))
			}
			for n, e := range ev {
				if e.Kind != EventRevoke || e.Origin != "a" || e.SN != testSN || e.Reason != fmt.Sprint("disabled ", n) || e.Time.IsZero() {
					return fmt.Errorf("subscriber %d event %d: %+v", i, n, e)
				}
			}
			return nil
		})
	}
	// C is cut off: node 3 is down; B publishes; C gets it when back.
	c.stop(2)
	if err := b.Bus().Publish(ctx, Event{Kind: EventInvalidate, SN: testSN, Reason: "commit"}); err != nil {
		t.Fatal(err)
	}
	c.start(2)
	c.waitReady()
	checkFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		ev := got(2)
		if len(ev) < 4 || ev[3].Kind != EventInvalidate || ev[3].Origin != "b" {
			return fmt.Errorf("C after reconnecting: %+v", ev)
		}
		return nil
	})
	// C is cut off again and the stream loses what C missed: C gets a
	// resync before the next event.
	c.stop(2)
	if err := b.Bus().Publish(ctx, Event{Kind: EventInvalidate, SN: testSN, Reason: "lost"}); err != nil {
		t.Fatal(err)
	}
	stream, err := a.js.Stream(ctx, EventStream)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.DeleteMsg(ctx, lastSeq(t, a)); err != nil {
		t.Fatal(err)
	}
	if err := b.Bus().Publish(ctx, Event{Kind: EventRevoke, SN: testSN, Reason: "after"}); err != nil {
		t.Fatal(err)
	}
	c.start(2)
	c.waitReady()
	checkFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		ev := got(2)
		if len(ev) < 6 || ev[4].Kind != EventResync || ev[5].Reason != "after" {
			return fmt.Errorf("C after a gap: %+v", ev[min(4, len(ev)):])
		}
		return nil
	})
	if err := a.Bus().Publish(ctx, Event{Kind: EventResync}); err == nil {
		t.Fatal("published a resync")
	}
	if err := a.Bus().Publish(ctx, Event{Kind: "Bad.Kind"}); err == nil {
		t.Fatal("published a kind with a dot")
	}
}

func lastSeq(t *testing.T, f *Fleet) uint64 {
	t.Helper()
	s, err := f.js.Stream(context.Background(), EventStream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.LastSeq
}

// TestRequestAndGather: a request reaches the broker named, its error
// comes back typed, an unknown broker fails at once; Gather collects one
// reply per live broker, and a broker that died (its liveness key still
// fresh) fails with ErrUnknownBroker instead of making Gather wait.
func TestRequestAndGather(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	fs := []*Fleet{c.open("a", 0, nil), c.open("b", 1, nil), c.open("c", 2, nil)}
	for _, f := range fs {
		id := f.BrokerID()
		if _, err := f.Handle("sessions", func(_ context.Context, req []byte) ([]byte, error) {
			if string(req) == "fail" {
				return nil, errors.New("no such terminal")
			}
			return []byte(id + ":" + string(req)), nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	// The handlers' subscriptions reach the other nodes over the routes.
	checkFor(t, 5*time.Second, 10*time.Millisecond, func() error {
		for _, f := range fs {
			for _, to := range fs {
				if _, err := f.Request(ctx, to.BrokerID(), "sessions", nil); err != nil {
					return err
				}
			}
		}
		return nil
	})
	got, err := fs[0].Request(ctx, "c", "sessions", []byte("list"))
	if err != nil || string(got) != "c:list" {
		t.Fatalf("request: %q %v", got, err)
	}
	_, err = fs[0].Request(ctx, "b", "sessions", []byte("fail"))
	var re *RemoteError
	if !errors.As(err, &re) || re.Msg != "no such terminal" || re.Broker != "b" {
		t.Fatalf("remote error: %v", err)
	}
	if _, err := fs[0].Request(ctx, "nobody", "sessions", nil); !errors.Is(err, ErrUnknownBroker) {
		t.Fatalf("unknown broker: %v", err)
	}
	if _, err := fs[0].Request(ctx, "b", "other", nil); !errors.Is(err, ErrUnknownBroker) {
		t.Fatalf("unknown method: %v", err)
	}
	replies, err := fs[1].Gather(ctx, "sessions", []byte("x"))
	if err != nil || len(replies) != 3 {
		t.Fatalf("gather: %+v %v", replies, err)
	}
	for i, r := range replies {
		if r.Err != nil || string(r.Data) != fs[i].BrokerID()+":x" {
			t.Fatalf("gather reply %d: %+v", i, r)
		}
	}
	fs[2].crash()
	start := time.Now()
	replies, err = fs[1].Gather(ctx, "sessions", []byte("y"))
	if err != nil {
		t.Fatal(err)
	}
	var gone int
	for _, r := range replies {
		if r.Broker == "c" && errors.Is(r.Err, ErrUnknownBroker) {
			gone++
		} else if r.Err != nil {
			t.Fatalf("gather reply: %+v", r)
		}
	}
	if gone != 1 && len(replies) != 2 { // listed but gone, or already expired
		t.Fatalf("gather after c died: %+v", replies)
	}
	t.Logf("gather with a dead broker answered in %s", time.Since(start))
}

// TestRequestTimeout: a handler slower than the caller's deadline gives
// ErrTimeout.
func TestRequestTimeout(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	a, b := c.open("a", 0, nil), c.open("b", 0, nil)
	release := make(chan struct{})
	if _, err := b.Handle("slow", func(ctx context.Context, _ []byte) ([]byte, error) {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil, nil
	}); err != nil {
		t.Fatal(err)
	}
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := a.Request(ctx, "b", "slow", nil); !errors.Is(err, ErrTimeout) {
		t.Fatalf("slow handler: %v, want ErrTimeout", err)
	}
}

// TestLeaseFailover: of three brokers competing for a lease, one holds it
// at any time, never two; when the holder stops (releasing) or crashes, one
// of the others takes over.
func TestLeaseFailover(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	fs := []*Fleet{c.open("a", 0, nil), c.open("b", 1, nil), c.open("c", 2, nil)}
	ttl := 600 * time.Millisecond
	leases := make([]*Lease, 3)
	var gains atomic.Int32
	for i, f := range fs {
		l, err := f.Lease("sms-retry", LeaseOptions{TTL: ttl, OnGain: func() { gains.Add(1) }})
		if err != nil {
			t.Fatal(err)
		}
		leases[i] = l
	}
	// A watchdog checks all along that no two hold it at once.
	stop := make(chan struct{})
	var doubles atomic.Int32
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			n := 0
			for _, l := range leases {
				if l.Held() {
					n++
				}
			}
			if n > 1 {
				doubles.Add(1)
			}
		}
	}()
	holder := func(except ...int) int {
		h := -1
		checkFor(t, 10*time.Second, 20*time.Millisecond, func() error {
			for i, l := range leases {
				if l.Held() && !slices.Contains(except, i) {
					h = i
					return nil
				}
			}
			return errors.New("nobody holds the lease")
		})
		return h
	}
	first := holder()
	leases[first].Stop()
	second := holder(first)
	fs[second].crash()
	third := holder(first, second)
	close(stop)
	wg.Wait()
	t.Logf("holders: %s, %s, %s; gains: %d", fs[first].BrokerID(), fs[second].BrokerID(), fs[third].BrokerID(), gains.Load())
	if doubles.Load() != 0 {
		t.Fatalf("two brokers held the lease at once %d times", doubles.Load())
	}
}

// TestDirectoryWatchAfterCutOff: a broker cut off from NATS while another
// registers a session learns of it when it is back (the takeover still
// happens), and its watch starts again with a resync, so that it can
// re-register sessions swept meanwhile.
func TestDirectoryWatchAfterCutOff(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 3, nil)
	b := c.open("b", 1, nil)
	cc := c.open("c", 2, func(o *Options) { // node 3 only
		o.URLs = []string{c.url(2)}
		o.natsExtra = []nats.Option{nats.IgnoreDiscoveredServers()}
	})
	var mu sync.Mutex
	var seen []Change
	if _, err := cc.Directory().Watch(func(ch Change) {
		mu.Lock()
		seen = append(seen, ch)
		mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // writes retry through elections
	defer cancel()
	epoch, err := cc.Directory().Register(ctx, Entry{ClientID: testSN, Kind: KindTerminal, SN: testSN})
	if err != nil {
		t.Fatal(err)
	}
	c.stop(2)
	e2, err := b.Directory().Register(ctx, Entry{ClientID: testSN, Kind: KindTerminal, SN: testSN})
	if err != nil {
		t.Fatal(err)
	}
	c.start(2)
	c.waitReady()
	checkFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		mu.Lock()
		defer mu.Unlock()
		resyncs, takeover := 0, false
		for _, ch := range seen {
			if ch.Resync {
				resyncs++
			}
			if ch.ClientID == testSN && ch.Entry.Broker == "b" && ch.Epoch == e2 && e2 > epoch {
				takeover = true
			}
		}
		if resyncs < 2 || !takeover {
			return fmt.Errorf("resyncs %d, takeover seen %v: %+v", resyncs, takeover, seen)
		}
		return nil
	})
}

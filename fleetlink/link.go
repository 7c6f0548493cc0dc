// Package fleetlink joins one broker to its fleet: it implements the
// hook's seams for shared state (hook.SessionDirectory, hook.ChangeBook),
// the key service's write notification (keysvc.Options.OnWrite) and the
// admin API's Sessions, on package fleet's NATS JetStream. Package broker
// wires it in fleet mode; the hook and the key service know nothing of
// NATS.
//
// What it does for the broker:
//
//   - Takeover: every established session is registered in the fleet's
//     session directory (asynchronously, in order per ClientID); a newer
//     registration of the ClientID by another broker ends the session
//     here (hook.TakenOver) and discards its MQTT session.
//   - Caches: every write of a terminal record (keysvc.Options.OnWrite) is
//     told to every live broker before the write returns (request/reply,
//     bounded) and stored on the event stream for brokers that are cut
//     off; they drop the record from their caches (keysvc.Invalidate).
//     Registrations are told in the background.
//   - Revocations: Sessions.RevokeBy ends the terminal's sessions on every
//     broker before it returns, and stores the revocation on the stream.
//   - Admin calls: the session list is gathered from every broker;
//     disconnect and change start are sent to the broker holding the
//     session.
//   - Once per fleet: the holder of the lease "change-work" expires the
//     pending changes of the whole fleet and takes over the SMS sends of
//     brokers that are gone (the book lives in the bucket M2MGUARD_CHANGES).
//   - After a cut-off (a directory resync, or events missed): every cached
//     record is dropped and the local sessions missing from the directory
//     are registered again.
//   - After a restart: the sessions the broker restored from its session
//     store whose client logged in on another broker meanwhile are
//     discarded (DiscardMoved).
//
// Nothing it puts on NATS is secret: serial numbers, ClientIDs, addresses,
// broker ids, admin operators' names, change ids and times.
package fleetlink

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Options configure a Link. Fleet is required.
type Options struct {
	Fleet *fleet.Fleet // open; the caller closes it after the Link
	// NotifyTimeout bounds the wait for the other brokers' answers to an
	// invalidation or revocation (they also get it from the stream later,
	// if they miss it); 0 = 1 s.
	NotifyTimeout time.Duration
	// SweepEvery is how often the holder of the lease "change-work"
	// collects the expired changes and the orphaned SMS sends of the
	// fleet; 0 = 10 s.
	SweepEvery time.Duration
	// Logger gets the link's events; nil = slog.Default(). Never a secret.
	Logger *slog.Logger
	// Registerer gets the link's metrics (m2mguard_fleet_*); nil = none.
	Registerer prometheus.Registerer
}

// Errors of New.
var errOptions = errors.New("fleetlink: Options.Fleet is required")

// Link is one broker's part in its fleet. Create it with New before the
// key service and the hook (OnWrite, Directory and ChangeBook go into
// their options), then Attach both; Close it before the Fleet.
type Link struct {
	o   Options
	f   *fleet.Fleet
	log *slog.Logger
	m   *metrics
	id  string // this broker's id

	hook *hook.Hook      // set by Attach
	svc  *keysvc.Service // set by Attach

	dir   *directory
	book  *book
	notes *notifier

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine of the link

	mu     sync.Mutex
	stops  []func() // watch, subscription, handlers, lease: stopped at Close
	closed bool
}

// New returns the Link of the broker on o.Fleet. It creates the bucket
// of the change book (retrying through a leader election until ctx ends).
func New(ctx context.Context, o Options) (*Link, error) {
	if o.Fleet == nil {
		return nil, errOptions
	}
	if o.NotifyTimeout <= 0 {
		o.NotifyTimeout = time.Second
	}
	if o.SweepEvery <= 0 {
		o.SweepEvery = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	m, err := newMetrics(o.Registerer)
	if err != nil {
		return nil, err
	}
	l := &Link{o: o, f: o.Fleet, log: o.Logger.With("component", "fleetlink"), m: m, id: o.Fleet.BrokerID()}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	kv, err := o.Fleet.KeyValue(ctx, ChangeBucket, "m2mguard change deadlines and SMS sends", 0)
	if err != nil {
		l.cancel()
		return nil, err
	}
	l.dir = newDirectory(l)
	l.book = newBook(l, kv)
	l.notes = newNotifier(l)
	return l, nil
}

// ChangeBucket is the KV bucket of the change book: "deadline.<sn>" and
// "sms.<sn>.<rid>" keys.
const ChangeBucket = "M2MGUARD_CHANGES"

// Directory is the hook's session directory (hook.Options.Directory).
func (l *Link) Directory() hook.SessionDirectory { return l.dir }

// ChangeBook is the hook's change book (hook.Options.ChangeBook).
func (l *Link) ChangeBook() hook.ChangeBook { return l.book }

// OnWrite is the key service's write notification
// (keysvc.Options.OnWrite): the other brokers drop the record.
func (l *Link) OnWrite(w keysvc.Write) { l.notes.written(w) }

// Sessions is the admin API's Sessions (broker/admin.Options.Sessions),
// reaching every broker of the fleet.
func (l *Link) Sessions() *Sessions { return &Sessions{l: l} }

// SweepChanges does the fleet-wide change work now, if this broker holds
// the lease "change-work" (it does it every Options.SweepEvery anyway):
// the expired changes it collects reach its hook's next expiry sweep
// (hook.ExpireChanges), and the SMS sends of brokers that are gone are
// taken over. It reports whether this broker holds the lease.
func (l *Link) SweepChanges() bool {
	if l.book.lease == nil || !l.book.lease.Held() {
		return false
	}
	l.book.sweep()
	return true
}

// Attach starts the link's work for h, the broker's hook (created with
// Directory and ChangeBook), and svc, its key service (created with
// OnWrite): the directory watch, the event subscription, the request
// handlers of the other brokers' calls and the lease of the fleet-wide
// change work. Call it before the MQTT server serves.
func (l *Link) Attach(h *hook.Hook, svc *keysvc.Service) error {
	l.hook, l.svc = h, svc
	steps := []func() error{l.dir.start, l.notes.start, l.serve, l.book.start}
	for _, step := range steps {
		if err := step(); err != nil {
			l.Close()
			return err
		}
	}
	return nil
}

// addStop registers a stop function for Close; false after Close.
func (l *Link) addStop(fn func()) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.stops = append(l.stops, fn)
	return true
}

// goRun runs fn in a goroutine that Close waits for; fn returns when
// l.ctx ends.
func (l *Link) goRun(fn func()) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		fn()
	}()
}

// Close stops the link's watch, subscription, handlers and lease, writes
// what its queues hold (bounded: 2 s), and waits for its goroutines. Call
// it after the MQTT server has stopped (its sessions have ended), before
// the Fleet's Close.
func (l *Link) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	stops := l.stops
	l.stops = nil
	l.mu.Unlock()
	for i := len(stops) - 1; i >= 0; i-- {
		stops[i]()
	}
	l.dir.drain(2 * time.Second)
	l.book.drain(2 * time.Second)
	l.cancel()
	l.wg.Wait()
	return nil
}

// isGone reports an error of a KV operation on a key that is not there.
func isGone(err error) bool { return errors.Is(err, jetstream.ErrKeyNotFound) }

// metrics are the link's series.
type metrics struct {
	takeovers     prometheus.Counter
	invalidations *prometheus.CounterVec
	revocations   *prometheus.CounterVec
	pending       prometheus.GaugeFunc
	failures      *prometheus.CounterVec
	pendingFn     func() float64
}

func newMetrics(r prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		takeovers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "m2mguard_fleet_takeovers_total",
			Help: "Sessions this broker ended because a newer login of their ClientID on another broker took them over.",
		}),
		invalidations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_fleet_invalidations_total",
			Help: "Terminal records whose cached copies were dropped fleet-wide, by direction: sent (this broker wrote the record), applied (another broker did).",
		}, []string{"direction"}),
		revocations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_fleet_revocations_total",
			Help: "Revocations (disable, delete, rekey) by direction: sent to the fleet, applied from another broker.",
		}, []string{"direction"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "m2mguard_fleet_link_failures_total",
			Help: "Fleet operations that failed, by operation: register, unregister, notify (a broker did not answer an invalidation or revocation), publish, book, gather, request, lookup (restored sessions not checked at start).",
		}, []string{"op"}),
	}
	m.pendingFn = func() float64 { return 0 }
	m.pending = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "m2mguard_fleet_directory_pending",
		Help: "Session registrations and removals waiting to be written to the fleet's directory.",
	}, func() float64 { return m.pendingFn() })
	for _, d := range []string{"sent", "applied"} {
		m.invalidations.WithLabelValues(d)
		m.revocations.WithLabelValues(d)
	}
	for _, op := range []string{"register", "unregister", "notify", "publish", "book", "gather", "request", "lookup"} {
		m.failures.WithLabelValues(op)
	}
	if r == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.takeovers, m.invalidations, m.revocations, m.pending, m.failures} {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

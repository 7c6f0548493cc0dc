package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Directory is the fleet's session directory: which broker holds the
// session of each ClientID, since when, and its epoch. It lives in the
// KV bucket M2MGUARD_SESSIONS, keyed by the escaped ClientID (EscapeKey).
//
// A broker registers a session once it is established (one write per
// login) and unregisters it when it ends. A login of the same ClientID on
// another broker registers a newer epoch; the first broker sees the change
// through Watch and ends its local session (takeover). Unregister deletes
// only the epoch it registered, so the end of an old session never undoes
// a newer login elsewhere.
type Directory struct {
	f *Fleet

	mu       sync.Mutex
	watchers []chan struct{} // resync signals
}

// Entry is a session in the directory. It carries no secret.
type Entry struct {
	ClientID string    `json:"-"`                  // the key, unescaped
	Broker   string    `json:"broker"`             // the broker holding the session
	Kind     string    `json:"kind"`               // KindTerminal or KindApp
	SN       string    `json:"sn,omitempty"`       // a terminal's serial number
	App      string    `json:"app,omitempty"`      // an application's name
	Remote   string    `json:"remote,omitempty"`   // the client's address
	Protocol byte      `json:"protocol,omitempty"` // MQTT protocol version (4 or 5)
	Since    time.Time `json:"since"`              // when the session was established
	Epoch    uint64    `json:"-"`                  // the KV revision: larger is newer
}

// Kinds of Entry.
const (
	KindTerminal = "terminal"
	KindApp      = "app"
)

// Change is one change of the directory, as Watch delivers it.
type Change struct {
	// Resync marks the start of a full replay: the watch (re)started after
	// Watch was called or after this broker was cut off from the fleet,
	// and every current entry follows. The broker may have been swept as
	// gone meanwhile: re-register its live sessions that are missing.
	Resync bool
	// Current marks the end of the entries that follow a Resync: from
	// here on, changes as they happen.
	Current  bool
	ClientID string
	Entry    Entry  // the new entry; zero when Deleted
	Deleted  bool   // the session was unregistered (or swept)
	Epoch    uint64 // the revision of this change
}

// Directory returns the fleet's session directory.
func (f *Fleet) Directory() *Directory { return f.dir }

// maxEntrySize bounds a directory value before it is decoded.
const maxEntrySize = 4096

// Register records that this broker holds the session of e.ClientID (e's
// Broker is set to this broker) and returns its epoch. It is one write,
// retried through a leader election until ctx ends (5 s without a
// deadline).
func (d *Directory) Register(ctx context.Context, e Entry) (uint64, error) {
	key, err := EscapeKey(e.ClientID)
	if err != nil {
		return 0, fmt.Errorf("fleet: register: %w", err)
	}
	e.Broker = d.f.opts.BrokerID
	data, err := json.Marshal(e)
	if err != nil {
		return 0, fmt.Errorf("fleet: register: %w", err)
	}
	var rev uint64
	err = retry(ctx, func(ctx context.Context) (err error) {
		rev, err = d.f.sessions.Put(ctx, key, data)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("fleet: register %s: %w", e.ClientID, err)
	}
	return rev, nil
}

// Unregister removes the session of clientID if its epoch is still epoch:
// true if it did, false if a newer registration (or a sweep) came first,
// or if a retried attempt had removed it already.
func (d *Directory) Unregister(ctx context.Context, clientID string, epoch uint64) (bool, error) {
	key, err := EscapeKey(clientID)
	if err != nil {
		return false, fmt.Errorf("fleet: unregister: %w", err)
	}
	err = retry(ctx, func(ctx context.Context) error {
		return d.f.sessions.Delete(ctx, key, jetstream.LastRevision(epoch))
	})
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyRevisionMismatch) || isWrongLastSeqErr(err):
		return false, nil
	}
	return false, fmt.Errorf("fleet: unregister %s: %w", clientID, err)
}

// isWrongLastSeqErr reports a check-and-set conflict (codes 10071 and,
// for replicated streams, 10164).
func isWrongLastSeqErr(err error) bool {
	c := apiCode(err)
	return c == jetstream.JSErrCodeStreamWrongLastSequence || c == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}

// Lookup returns the session of clientID; false if there is none. It may
// lag another broker's Register or Unregister for a moment: JetStream
// answers a KV read from any replica of the bucket, which gives no
// read-after-write across connections (nats-server issue 6557). Writes
// never rely on it: Register takes a new epoch (the bucket's revision), and
// Unregister deletes only the epoch it is given (check and set).
func (d *Directory) Lookup(ctx context.Context, clientID string) (Entry, bool, error) {
	key, err := EscapeKey(clientID)
	if err != nil {
		return Entry{}, false, fmt.Errorf("fleet: lookup: %w", err)
	}
	var kve jetstream.KeyValueEntry
	err = retry(ctx, func(ctx context.Context) (err error) {
		kve, err = d.f.sessions.Get(ctx, key)
		return err
	})
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Entry{}, false, nil
	}
	if err != nil {
		return Entry{}, false, fmt.Errorf("fleet: lookup %s: %w", clientID, err)
	}
	e, err := decodeEntry(kve.Key(), kve.Value())
	if err != nil {
		return Entry{}, false, err
	}
	e.Epoch = kve.Revision()
	return e, true, nil
}

// List returns every session in the directory.
func (d *Directory) List(ctx context.Context) ([]Entry, error) {
	w, err := d.f.sessions.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("fleet: list sessions: %w", err)
	}
	defer func() { _ = w.Stop() }()
	var out []Entry
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("fleet: list sessions: %w", ctx.Err())
		case kve, ok := <-w.Updates():
			if !ok {
				return nil, fmt.Errorf("fleet: list sessions: watch ended")
			}
			if kve == nil {
				return out, nil // the initial values are all there
			}
			e, err := decodeEntry(kve.Key(), kve.Value())
			if err != nil {
				d.f.log.Warn("fleet: directory entry skipped", "error", err)
				continue
			}
			e.Epoch = kve.Revision()
			out = append(out, e)
		}
	}
}

// Sweep removes the sessions of brokers that are gone (whose liveness key
// expired) and returns how many. The holder of the fleet's
// "directory-sweep" lease runs it every Options.SweepEvery.
func (d *Directory) Sweep(ctx context.Context) (int, error) {
	live, err := d.f.Brokers(ctx)
	if err != nil {
		return 0, err
	}
	if len(live) == 0 {
		return 0, nil // not even this broker: the liveness bucket is not readable now
	}
	alive := make(map[string]bool, len(live))
	for _, b := range live {
		alive[b] = true
	}
	entries, err := d.List(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		if alive[e.Broker] {
			continue
		}
		ok, err := d.Unregister(ctx, e.ClientID, e.Epoch)
		if err != nil {
			return n, err
		}
		if ok {
			n++
		}
	}
	if n > 0 {
		d.f.log.Info("m2mguard fleet_sessions_swept", "event", "fleet_sessions_swept", "sessions", n)
	}
	return n, nil
}

// Watch calls fn with every change of the directory, in order, starting
// with a Resync, every current entry and a Current; after this broker was
// cut off from the fleet it does the same again. fn runs on one goroutine per
// Watch and must not block for long. stop ends the watch and waits; Close
// does it too.
func (d *Directory) Watch(fn func(Change)) (stop func(), err error) {
	resync := make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(d.f.ctx)
	done := make(chan struct{})
	stop = func() {
		cancel()
		<-done
	}
	if !d.f.addCloser(stop) {
		cancel()
		return nil, ErrClosed
	}
	d.mu.Lock()
	d.watchers = append(d.watchers, resync)
	d.mu.Unlock()
	d.f.wg.Add(1)
	go func() {
		defer d.f.wg.Done()
		defer close(done)
		defer d.dropWatcher(resync)
		for ctx.Err() == nil {
			d.watchOnce(ctx, fn, resync)
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond): // the watch failed: start again
			}
		}
	}()
	return stop, nil
}

// watchOnce runs one KV watch until ctx ends, a resync is asked for, or
// the watch fails.
func (d *Directory) watchOnce(ctx context.Context, fn func(Change), resync chan struct{}) {
	w, err := d.f.sessions.WatchAll(ctx)
	if err != nil {
		return
	}
	defer func() { _ = w.Stop() }()
	fn(Change{Resync: true})
	for {
		select {
		case <-ctx.Done():
			return
		case <-resync:
			return
		case kve, ok := <-w.Updates():
			if !ok {
				return
			}
			if kve == nil {
				fn(Change{Current: true}) // the end of the initial values
				continue
			}
			c := Change{Epoch: kve.Revision()}
			if id, err := UnescapeKey(kve.Key()); err == nil {
				c.ClientID = id
			} else {
				continue
			}
			if kve.Operation() != jetstream.KeyValuePut {
				c.Deleted = true
			} else {
				e, err := decodeEntry(kve.Key(), kve.Value())
				if err != nil {
					d.f.log.Warn("fleet: directory entry skipped", "error", err)
					continue
				}
				e.Epoch = kve.Revision()
				c.Entry = e
			}
			fn(c)
		}
	}
}

// resync restarts every watch (after the broker was cut off).
func (d *Directory) resync() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.watchers {
		select {
		case c <- struct{}{}:
		default:
		}
	}
}

func (d *Directory) dropWatcher(c chan struct{}) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, w := range d.watchers {
		if w == c {
			d.watchers = append(d.watchers[:i], d.watchers[i+1:]...)
			return
		}
	}
}

// ErrEntry is wrapped by the error of a directory value that does not
// decode.
var ErrEntry = errors.New("fleet: directory entry")

// decodeEntry parses a directory value, bounded, and sets its ClientID from
// the key.
func decodeEntry(key string, data []byte) (Entry, error) {
	var e Entry
	if len(data) > maxEntrySize {
		return e, fmt.Errorf("%w: %d bytes", ErrEntry, len(data))
	}
	id, err := UnescapeKey(key)
	if err != nil {
		return e, fmt.Errorf("%w: %w", ErrEntry, err)
	}
	if err := json.Unmarshal(data, &e); err != nil {
		return Entry{}, fmt.Errorf("%w: %w", ErrEntry, err)
	}
	if e.Broker == "" || e.Kind != KindTerminal && e.Kind != KindApp {
		return Entry{}, fmt.Errorf("%w: no broker or unknown kind", ErrEntry)
	}
	e.ClientID = id
	return e, nil
}

// ErrClosed is returned by the methods that start something after Close.
var ErrClosed = errors.New("fleet: closed")

// sweeper sweeps the directory every SweepEvery while this broker holds
// the sweep lease.
func (f *Fleet) sweeper(l *Lease) {
	t := time.NewTicker(f.opts.SweepEvery)
	defer t.Stop()
	for {
		select {
		case <-f.ctx.Done():
			return
		case <-t.C:
		}
		if !l.Held() {
			continue
		}
		ctx, cancel := context.WithTimeout(f.ctx, f.opts.SweepEvery)
		if _, err := f.dir.Sweep(ctx); err != nil && f.ctx.Err() == nil {
			f.log.Warn("fleet: directory sweep", "error", err)
		}
		cancel()
	}
}

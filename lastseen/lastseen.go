// Package lastseen remembers, per terminal, its last accepted login: when,
// from which address, over which MQTT version, and whether it took a
// session key. The hook records every login in memory (one map write under
// a sharded lock, no allocation once a terminal has an entry); a Table
// opened on a file writes the entries that changed in batches, every
// FlushInterval and at Close, to a bbolt file (mode 0600), so that they
// survive a restart. A kill -9 loses at most the last interval.
//
// Readers (the admin API and its reports) ask Get. Book is the interface
// the hook and the admin API use, so that a fleet of brokers can keep the
// same answers in shared state instead.
package lastseen

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/m2mguard/m2mguard/codec"
)

// Entry is one terminal's last accepted login.
type Entry struct {
	At         time.Time // when the login was accepted
	Remote     string    // the client's address, host:port (a trusted proxy's PROXY header decides it)
	Protocol   byte      // MQTT protocol version: 4 = 3.1.1, 5 = 5
	SessionKey bool      // the login took a session key
}

// Book is what the broker keeps last-seen entries in: *Table, or a fleet's
// shared state. Seen is on the login path and must neither block on I/O nor
// allocate per call once sn has an entry.
type Book interface {
	// Seen records an accepted login of sn.
	Seen(sn string, e Entry)
	// Get returns the last accepted login of sn, if there was one.
	Get(sn string) (Entry, bool)
	// Forget drops the entry of sn (the terminal was deleted: a new one
	// with that serial number has never been seen).
	Forget(sn string)
}

// Options configure a Table. The zero value is useful.
type Options struct {
	// FlushInterval is how often changed entries are written to the file;
	// 0 = 5 s. A kill -9 loses at most this much.
	FlushInterval time.Duration
	Logger        *slog.Logger // nil = slog.Default()
}

// DefaultFlushInterval is Options.FlushInterval's default.
const DefaultFlushInterval = 5 * time.Second

// Stats are a Table's counters.
type Stats struct {
	Entries       int    // terminals with an entry
	Flushes       uint64 // batches written
	FlushFailures uint64 // batches that failed (their entries are written with the next)
	Flushed       uint64 // entries written in all
}

const shardCount = 64 // a power of two

// Table is a Book in memory, optionally backed by a file. It is safe for
// concurrent use.
type Table struct {
	shards [shardCount]shard
	db     *bolt.DB // nil: memory only
	log    *slog.Logger

	flushMu  sync.Mutex // one flush at a time
	flushes  atomic.Uint64
	failures atomic.Uint64
	flushed  atomic.Uint64

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error
}

var _ Book = (*Table)(nil)

type shard struct {
	mu    sync.Mutex
	m     map[string]slot
	dirty []string // keys changed since the last flush, each once
}

// slot is an entry as the table holds it.
type slot struct {
	at     int64 // unix nanoseconds
	remote string
	proto  byte
	key    bool
	dirty  bool // in its shard's dirty list
	gone   bool // forgotten; removed from the file by the next flush
}

// NewMemory returns a Table that keeps its entries in memory only (tests,
// embedders without a data directory). Close is a no-op for it.
func NewMemory() *Table {
	t := &Table{log: slog.Default()}
	t.init()
	return t
}

func (t *Table) init() {
	for i := range t.shards {
		t.shards[i].m = map[string]slot{}
	}
}

// Open opens (creating it 0600) the file at path, loads its entries and
// starts writing changed entries back every opts.FlushInterval until Close.
func Open(path string, opts Options) (*Table, error) {
	if opts.FlushInterval <= 0 {
		opts.FlushInterval = DefaultFlushInterval
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("lastseen: open %s: %w", path, err)
	}
	t := &Table{db: db, log: opts.Logger, stop: make(chan struct{}), done: make(chan struct{})}
	t.init()
	if err := t.load(); err != nil {
		db.Close()
		return nil, fmt.Errorf("lastseen: load %s: %w", path, err)
	}
	go t.flushLoop(opts.FlushInterval)
	return t, nil
}

var bucket = []byte("lastseen")

// load reads every entry of the file into the table (before it is shared).
// An entry that does not decode is skipped and logged: last-seen data is
// informational, never a reason not to start.
func (t *Table) load() error {
	bad := 0
	err := t.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucket)
		if err != nil {
			return err
		}
		return b.ForEach(func(k, v []byte) error {
			e, err := decode(v)
			if err != nil || codec.ValidateSN(string(k)) != nil {
				bad++
				return nil
			}
			sn := string(k)
			t.shards[shardOf(sn)].m[sn] = slot{at: e.At.UnixNano(), remote: e.Remote, proto: e.Protocol, key: e.SessionKey}
			return nil
		})
	})
	if bad > 0 {
		t.log.Warn("last-seen entries skipped: they do not decode", "count", bad)
	}
	return err
}

// shardOf is FNV-1a of sn, without allocating.
func shardOf(sn string) int {
	h := uint32(2166136261)
	for i := 0; i < len(sn); i++ {
		h ^= uint32(sn[i])
		h *= 16777619
	}
	return int(h & (shardCount - 1))
}

// Seen implements Book: one map write under the shard's lock.
func (t *Table) Seen(sn string, e Entry) {
	s := &t.shards[shardOf(sn)]
	s.mu.Lock()
	old, ok := s.m[sn]
	if !ok || !old.dirty {
		s.dirty = append(s.dirty, sn)
	}
	s.m[sn] = slot{at: e.At.UnixNano(), remote: e.Remote, proto: e.Protocol, key: e.SessionKey, dirty: true}
	s.mu.Unlock()
}

// Get implements Book.
func (t *Table) Get(sn string) (Entry, bool) {
	s := &t.shards[shardOf(sn)]
	s.mu.Lock()
	v, ok := s.m[sn]
	s.mu.Unlock()
	if !ok || v.gone {
		return Entry{}, false
	}
	return Entry{At: time.Unix(0, v.at).UTC(), Remote: v.remote, Protocol: v.proto, SessionKey: v.key}, true
}

// Forget implements Book.
func (t *Table) Forget(sn string) {
	s := &t.shards[shardOf(sn)]
	s.mu.Lock()
	defer s.mu.Unlock()
	old, ok := s.m[sn]
	if !ok || old.gone {
		return
	}
	if t.db == nil {
		delete(s.m, sn)
		return
	}
	if !old.dirty {
		s.dirty = append(s.dirty, sn)
	}
	s.m[sn] = slot{gone: true, dirty: true}
}

// Stats returns the table's counters.
func (t *Table) Stats() Stats {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n += len(s.m)
		s.mu.Unlock()
	}
	return Stats{Entries: n, Flushes: t.flushes.Load(), FlushFailures: t.failures.Load(), Flushed: t.flushed.Load()}
}

func (t *Table) flushLoop(every time.Duration) {
	defer close(t.done)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-t.stop:
			return
		case <-tick.C:
			if err := t.Flush(); err != nil {
				t.log.Warn("last-seen entries not written; retried with the next batch", "err", err.Error())
			}
		}
	}
}

// change is one entry to write (or, gone, to delete).
type change struct {
	sn string
	slot
}

// Flush writes the entries changed since the last flush to the file, in
// one transaction. On failure they stay marked and go with the next one.
// It does nothing for a Table of NewMemory.
func (t *Table) Flush() error {
	if t.db == nil {
		return nil
	}
	t.flushMu.Lock()
	defer t.flushMu.Unlock()
	var batch []change
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for _, sn := range s.dirty {
			v := s.m[sn]
			batch = append(batch, change{sn, v})
			if v.gone {
				delete(s.m, sn)
			} else {
				v.dirty = false
				s.m[sn] = v
			}
		}
		s.dirty = s.dirty[:0]
		s.mu.Unlock()
	}
	if len(batch) == 0 {
		return nil
	}
	err := t.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucket)
		for _, c := range batch {
			if c.gone {
				if err := b.Delete([]byte(c.sn)); err != nil {
					return err
				}
				continue
			}
			e := Entry{At: time.Unix(0, c.at), Remote: c.remote, Protocol: c.proto, SessionKey: c.key}
			// bolt keeps the value until the commit: one buffer each.
			if err := b.Put([]byte(c.sn), encode(make([]byte, 0, headerLen+len(c.remote)), e)); err != nil {
				return err
			}
		}
		return nil
	})
	t.flushes.Add(1)
	if err != nil {
		t.failures.Add(1)
		t.remark(batch)
		return fmt.Errorf("lastseen: flush %d entries: %w", len(batch), err)
	}
	t.flushed.Add(uint64(len(batch)))
	return nil
}

// remark marks the entries of a failed batch changed again, unless a newer
// login or a Forget changed them since.
func (t *Table) remark(batch []change) {
	for _, c := range batch {
		s := &t.shards[shardOf(c.sn)]
		s.mu.Lock()
		cur, ok := s.m[c.sn]
		switch {
		case !ok && c.gone: // the forget failed to reach the file
			s.m[c.sn] = slot{gone: true, dirty: true}
			s.dirty = append(s.dirty, c.sn)
		case ok && !cur.dirty:
			cur.dirty = true
			s.m[c.sn] = cur
			s.dirty = append(s.dirty, c.sn)
		}
		s.mu.Unlock()
	}
}

// Close stops the flushing, writes what changed since the last flush and
// closes the file. Call it after the last Seen (after the MQTT server has
// stopped). It is safe to call more than once.
func (t *Table) Close() error {
	if t.db == nil {
		return nil
	}
	t.closeOnce.Do(func() {
		close(t.stop)
		<-t.done
		t.closeErr = errors.Join(t.Flush(), t.db.Close())
	})
	return t.closeErr
}

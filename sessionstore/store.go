// Package sessionstore keeps mochi-mqtt's sessions across restarts: the
// persistent sessions (clients, subscriptions, QoS 1 and 2 messages in
// flight or queued for offline clients) and the retained messages, in one
// bbolt file sealed under the broker's master key. It is a mochi storage
// hook:
//
//	store, err := sessionstore.Open(path, sessionstore.Options{MasterKey: key, Server: server})
//	server.AddHook(m2mguardHook, nil) // first: it opens uplinks and drops refused packets
//	server.AddHook(store, nil)        // then the store, which sees what is published
//	server.Serve()                    // restores what the file holds
//	...
//	mochifix.Close(server, ids, timeout) // stops the hooks: the store is flushed and closed
//
// What it adds to mochi's own bolt hook (hooks/storage/bolt), whose event
// handling it follows:
//
//   - Nothing in clear: every value is sealed (AES-256-GCM, key derived
//     from the master key with HKDF), bound to its bucket and key; keys are
//     keyed hashes, so the file shows no ClientID or topic (seal.go).
//   - A restored session can be resumed: messages in flight are stored
//     with their packet id (mochi's bolt hook drops it and the resend
//     fails with "missing packet id").
//   - A session keeps what a takeover hands on: the messages mochi drops
//     from the old connection live on in the new one under the same keys,
//     so they stay in the file; a refused subscription is never stored.
//   - Session expiry counts from the real disconnect: each client record
//     holds its disconnect time. Sessions past their expiry are dropped at
//     start; the others expire on time (mochi would count from the
//     restart).
//   - A QoS 1 or 2 message with a persistent subscriber is written to a
//     journal before mochi sends the PUBACK: mochi acknowledges before it
//     hands the message to the subscribers' sessions, so without the
//     journal a message acknowledged just before a kill -9 could be lost.
//     The start after an unclean stop publishes the journal again
//     (journal.go).
//
// Durability: every event's change is committed to the file (the
// kernel's page cache) before the call returns; concurrent changes share a
// transaction (writer.go). By default the file is fsynced every second
// (Options.SyncEvery), not at each commit: kill -9 loses nothing
// acknowledged (a message handed on in the last second may be delivered
// once more); a power loss or kernel crash loses at most the last second
// and may leave the file damaged, in which case it is set aside at the
// next start (see Open). Options.SyncCommits fsyncs every commit instead.
//
// Clean sessions are never stored: they cost a read at most.
package sessionstore

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
	bolt "go.etcd.io/bbolt"
)

var (
	bucketMeta     = []byte("meta")
	bucketClients  = []byte("clients")
	bucketSubs     = []byte("subs")
	bucketInflight = []byte("inflight")
	bucketRetained = []byte("retained")
	bucketJournal  = []byte("journal")
	allBuckets     = [][]byte{bucketMeta, bucketClients, bucketSubs, bucketInflight, bucketRetained, bucketJournal}

	keyCheck = []byte("check") // meta: checkPlaintext, sealed
	keyState = []byte("state") // meta: stateOpen while a process has the file, stateClosed after Close
)

const (
	stateOpen   = "open"
	stateClosed = "closed"
)

// MasterKeySize is the size of Options.MasterKey.
const MasterKeySize = 32

// Options configure Open. MasterKey and Server are required.
type Options struct {
	// MasterKey is the broker's master key (boltstore.LoadOrCreateMasterKey);
	// the store derives its own keys from it with HKDF.
	MasterKey []byte
	// Server is the mochi server the store is added to: it expires the
	// sessions it restored and publishes the journal through it (with
	// InlineClient on).
	Server *mqtt.Server

	// SyncEvery is how often the file is fsynced; 0 = every second.
	SyncEvery time.Duration
	// SyncCommits fsyncs at every commit (bbolt's default): a power loss
	// then loses nothing acknowledged, at a cost per message (BENCHMARKS.md).
	SyncCommits bool
	// OnExpire is told of every restored session the store expires, as
	// mochi tells its hooks' OnClientExpired (mochi would expire it only
	// later, counting from the restart). The broker passes the M2M1 hook's.
	OnExpire func(cl *mqtt.Client)
	// Timeout bounds the wait for the file's lock held by another process;
	// 0 = 5 s.
	Timeout time.Duration
	// Logger: what was restored, set aside or dropped, and write errors
	// (at most one line a second); nil = slog.Default().
	Logger *slog.Logger
	// Now is the clock; nil = time.Now.
	Now func() time.Time
}

// Hook is the session store, a mochi storage hook. Create it with Open;
// it is safe for concurrent use, as mochi calls it from every client's
// goroutine.
type Hook struct {
	mqtt.HookBase
	opts   Options
	path   string
	db     *bolt.DB
	seal   *sealer
	server *mqtt.Server
	log    *slog.Logger

	// mu is read-held by every use of db and write-held by Close, after
	// which the events are ignored (mochi may still report a client's end
	// after the hooks were stopped).
	mu     sync.RWMutex
	closed bool

	// clientMu orders the writes of client records (OnSessionEstablished,
	// OnDisconnect): see OnDisconnect.
	clientMu sync.Mutex

	// loaded holds what Open read, until mochi has taken it (Stored*).
	loaded *loaded

	// restored are the sessions restored at start that have not been
	// resumed, with the time they expire (load.go, expireRestored).
	restoredMu sync.Mutex
	restored   map[string]restoredSession

	stop      chan struct{}
	wg        sync.WaitGroup
	initOnce  sync.Once
	closeOnce sync.Once
	closeErr  error
	started   atomic.Bool // OnStarted has run: the journal read at start is published

	// The journal (journal.go): the entry each client has open, and the
	// entries handed on, to be deleted.
	journalOpen sync.Map // *mqtt.Client → []byte
	doneMu      sync.Mutex
	done        [][]byte

	// The writer (writer.go).
	changes    chan change
	writerStop chan struct{}
	writerWG   sync.WaitGroup
	donePool   sync.Pool // of chan error

	writes      atomic.Uint64
	commits     atomic.Uint64
	writeErrors atomic.Uint64
	errLogged   atomic.Int64 // unix second of the last write error logged
}

// Open opens the session file at path, or creates it (0600), and reads
// what it holds for mochi to restore when the server starts (Serve). A
// master key that does not open the file gives ErrWrongKey. A file that
// is damaged (a power loss under the default durability) is renamed to
// path.damaged-<unix time> and a new one is started, logged at level
// Error: the sessions it held are lost, never read half-way.
func Open(path string, opts Options) (*Hook, error) {
	if len(opts.MasterKey) != MasterKeySize {
		return nil, fmt.Errorf("sessionstore: the master key must be %d bytes", MasterKeySize)
	}
	if opts.Server == nil {
		return nil, errors.New("sessionstore: Options.Server is required")
	}
	if opts.SyncEvery <= 0 {
		opts.SyncEvery = time.Second
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s, err := newSealer(opts.MasterKey)
	if err != nil {
		return nil, fmt.Errorf("sessionstore: %w", err)
	}
	h := &Hook{opts: opts, path: path, seal: s, server: opts.Server, log: opts.Logger,
		restored: map[string]restoredSession{}, stop: make(chan struct{})}
	if err := h.openFile(); err != nil {
		return nil, err
	}
	h.startWriter()
	return h, nil
}

// Path is the session file.
func (h *Hook) Path() string { return h.path }

// ID names the hook to mochi.
func (h *Hook) ID() string { return "m2mguard-sessions" }

// Provides lists the events the store handles.
func (h *Hook) Provides(b byte) bool {
	switch b {
	case mqtt.OnStarted, mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnSubscribed, mqtt.OnUnsubscribed,
		mqtt.OnPublish, mqtt.OnPublished, mqtt.OnRetainMessage, mqtt.OnRetainedExpired,
		mqtt.OnQosPublish, mqtt.OnQosComplete, mqtt.OnQosDropped, mqtt.OnClientExpired,
		mqtt.StoredClients, mqtt.StoredSubscriptions, mqtt.StoredInflightMessages, mqtt.StoredRetainedMessages, mqtt.StoredSysInfo:
		return true
	}
	return false
}

// Init starts the store's loop: the periodic fsync, the expiry of restored
// sessions and the removal of journal entries whose PUBACK was never sent.
// mochi calls it when the hook is added; Stop ends it.
func (h *Hook) Init(config any) error {
	h.initOnce.Do(func() {
		h.wg.Add(1)
		go h.loop()
	})
	return nil
}

// Stop is Close; mochi calls it when the server closes, after every
// client's goroutine has ended.
func (h *Hook) Stop() error { return h.Close() }

// Close ends the loop, fsyncs and closes the file, marked as closed
// cleanly. Later events are ignored. It is safe to call more than once.
func (h *Hook) Close() error {
	h.closeOnce.Do(func() {
		close(h.stop)
		h.wg.Wait()
		h.flushJournal()
		h.mu.Lock()
		defer h.mu.Unlock()
		h.closed = true
		h.stopWriter()
		err := h.db.Update(func(tx *bolt.Tx) error {
			return tx.Bucket(bucketMeta).Put(keyState, []byte(stateClosed))
		})
		if serr := h.db.Sync(); err == nil {
			err = serr
		}
		if cerr := h.db.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			h.closeErr = fmt.Errorf("sessionstore: close %s: %w", h.path, err)
		}
	})
	return h.closeErr
}

// Stats are the store's counters.
type Stats struct {
	Writes      uint64 // changes written (an event's records)
	Commits     uint64 // transactions, each with one or more changes (writer.go)
	WriteErrors uint64 // changes that failed: kept in memory only
}

// Stats returns the store's counters.
func (h *Hook) Stats() Stats {
	return Stats{Writes: h.writes.Load(), Commits: h.commits.Load(), WriteErrors: h.writeErrors.Load()}
}

func (h *Hook) loop() {
	defer h.wg.Done()
	tick := time.NewTicker(h.opts.SyncEvery)
	defer tick.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-tick.C:
			h.flushJournal()
			h.sync()
			h.expireRestored()
			h.dropStaleJournal()
		}
	}
}

// sync fsyncs the file (the default durability: see the package doc).
func (h *Hook) sync() {
	if h.opts.SyncCommits {
		return
	}
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.closed {
		return
	}
	if err := h.db.Sync(); err != nil {
		h.failed("fsync", err)
	}
}

// has reports whether bucket holds a record at key, or one under the
// prefix key when prefix is set. Reading costs no write, so the events of
// clean sessions, which are never stored, cost a lookup at most.
func (h *Hook) has(bucket, key []byte) bool {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.closed {
		return false
	}
	found := false
	_ = h.db.View(func(tx *bolt.Tx) error {
		k, _ := tx.Bucket(bucket).Cursor().Seek(key)
		found = k != nil && bytes.HasPrefix(k, key)
		return nil
	})
	return found
}

// holds reports whether bucket holds a record at key that opens to
// plaintext.
func (h *Hook) holds(bucket, key, plaintext []byte) bool {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.closed {
		return false
	}
	same := false
	_ = h.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucket).Get(key); v != nil {
			pt, err := h.seal.open(bucket, key, v)
			same = err == nil && bytes.Equal(pt, plaintext)
		}
		return nil
	})
	return same
}

func (h *Hook) failed(what string, err error) {
	h.writeErrors.Add(1)
	now := time.Now().Unix()
	if last := h.errLogged.Load(); now > last && h.errLogged.CompareAndSwap(last, now) {
		h.log.Error("session store write failed: the change is kept in memory only, a restart loses it",
			"op", what, "file", h.path, "err", err, "failures", h.writeErrors.Load())
	}
}

// put seals record (JSON) into bucket at key.
func (h *Hook) put(tx *bolt.Tx, bucket, key []byte, record any) error {
	pt, err := json.Marshal(record)
	if err != nil {
		return err
	}
	return tx.Bucket(bucket).Put(key, h.seal.seal(bucket, key, pt))
}

// deletePrefix deletes every record of bucket whose key starts with prefix.
// (The keys are collected first: a bbolt cursor may skip a key after a
// delete.)
func deletePrefix(tx *bolt.Tx, bucket, prefix []byte) error {
	b := tx.Bucket(bucket)
	var keys [][]byte
	c := b.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		keys = append(keys, bytes.Clone(k))
	}
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// deleteSession deletes a client's record, subscriptions and messages in
// flight.
func deleteSession(tx *bolt.Tx, cid []byte) error {
	for _, b := range [][]byte{bucketClients, bucketSubs, bucketInflight} {
		if err := deletePrefix(tx, b, cid); err != nil {
			return err
		}
	}
	return nil
}

// clientRecord is a stored client: mochi's storage.Client (without its
// will and authentication data, which a restored session never uses) and
// the time its connection ended, 0 while it is connected.
type clientRecord struct {
	Client       storage.Client `json:"client"`
	Disconnected int64          `json:"disconnected,omitempty"`
}

func newClientRecord(cl *mqtt.Client, disconnected int64) clientRecord {
	p := cl.Properties.Props
	return clientRecord{
		Client: storage.Client{
			ID: cl.ID, T: storage.ClientKey, Remote: cl.Net.Remote, Listener: cl.Net.Listener,
			Username: cl.Properties.Username, Clean: cl.Properties.Clean, ProtocolVersion: cl.Properties.ProtocolVersion,
			Properties: storage.ClientProperties{
				SessionExpiryInterval:     p.SessionExpiryInterval,
				SessionExpiryIntervalFlag: p.SessionExpiryIntervalFlag,
				RequestProblemInfo:        p.RequestProblemInfo,
				RequestProblemInfoFlag:    p.RequestProblemInfoFlag,
				RequestResponseInfo:       p.RequestResponseInfo,
				ReceiveMaximum:            p.ReceiveMaximum,
				TopicAliasMaximum:         p.TopicAliasMaximum,
				User:                      p.User,
				MaximumPacketSize:         p.MaximumPacketSize,
			},
		},
		Disconnected: disconnected,
	}
}

// newMessage is the stored form of a PUBLISH (or of the QoS 2 state that
// replaced it in flight), packet id included.
func newMessage(clientID string, pk packets.Packet) storage.Message {
	p := pk.Properties
	return storage.Message{
		T: storage.InflightKey, Client: clientID, Origin: pk.Origin, FixedHeader: pk.FixedHeader,
		TopicName: pk.TopicName, Payload: pk.Payload, Created: pk.Created, Sent: time.Now().Unix(), PacketID: pk.PacketID,
		Properties: storage.MessageProperties{
			PayloadFormat: p.PayloadFormat, PayloadFormatFlag: p.PayloadFormatFlag,
			MessageExpiryInterval: p.MessageExpiryInterval, ContentType: p.ContentType,
			ResponseTopic: p.ResponseTopic, CorrelationData: p.CorrelationData,
			SubscriptionIdentifier: p.SubscriptionIdentifier, User: p.User,
		},
	}
}

// persistent reports whether cl's session outlives its connection, as
// mochi decides it when the connection ends. Only persistent sessions are
// stored.
func persistent(cl *mqtt.Client) bool {
	if cl.Net.Inline {
		return false
	}
	p := &cl.Properties
	if p.ProtocolVersion == 5 {
		return p.Props.SessionExpiryInterval > 0
	}
	return !p.Clean
}

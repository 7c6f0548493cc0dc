package sessionstore

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// loaded is what Open read from the file, handed to mochi by the Stored*
// calls of Serve and to OnStarted.
type loaded struct {
	clients  []storage.Client
	subs     []storage.Subscription
	inflight []storage.Message
	retained []storage.Message
	journal  []journalEntry
	// deadlines: when each restored session expires (unix seconds),
	// counted from its disconnect.
	deadlines map[string]int64
}

type journalEntry struct {
	key []byte
	msg storage.Message
}

// restoredSession is a session restored at start and not resumed since.
type restoredSession struct {
	cl       *mqtt.Client
	deadline int64
}

// damagedError: the file cannot be read as a session store.
type damagedError struct{ err error }

func (e *damagedError) Error() string { return "damaged: " + e.err.Error() }
func (e *damagedError) Unwrap() error { return e.err }

// openFile opens the file and loads it; a damaged file is set aside and a
// new one started.
func (h *Hook) openFile() error {
	err := h.tryOpen()
	var damaged *damagedError
	if !errors.As(err, &damaged) {
		return err
	}
	aside := fmt.Sprintf("%s.damaged-%d", h.path, h.opts.Now().Unix())
	if rerr := os.Rename(h.path, aside); rerr != nil {
		return fmt.Errorf("sessionstore: %s is damaged (%v) and cannot be set aside: %w", h.path, damaged.err, rerr)
	}
	h.log.Error("session file damaged (a power loss or a change outside m2mguard): set aside; the broker starts with no stored sessions, retained or queued messages",
		"file", h.path, "set_aside", aside, "err", damaged.err)
	return h.tryOpen()
}

// tryOpen opens the file, checks the key and, after an unclean stop, the
// file's structure, and loads every record. Damage shows as an error from
// bbolt, a failed check, or a panic of bbolt on a page it cannot read.
func (h *Hook) tryOpen() (err error) {
	db, err := bolt.Open(h.path, 0o600, &bolt.Options{Timeout: h.opts.Timeout, NoSync: !h.opts.SyncCommits,
		NoFreelistSync: true, FreelistType: bolt.FreelistMapType})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return fmt.Errorf("sessionstore: open %s: locked by another process", h.path)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum), errors.Is(err, bolterrors.ErrVersionMismatch):
		return &damagedError{err}
	case err != nil:
		return fmt.Errorf("sessionstore: open %s: %w", h.path, err)
	}
	defer func() {
		if p := recover(); p != nil {
			err = &damagedError{fmt.Errorf("%v", p)}
		}
		if err != nil {
			db.Close()
		}
	}()
	h.db = db
	clean, err := h.initFile()
	if err != nil {
		return err
	}
	if !clean {
		if err := db.View(func(tx *bolt.Tx) error {
			for cerr := range tx.Check() {
				return cerr
			}
			return nil
		}); err != nil {
			return &damagedError{err}
		}
	}
	return h.load()
}

// initFile creates the buckets and the key check of a new file, checks
// the key of an existing one and marks it open. clean reports whether the
// file is new or was closed cleanly (else its structure is checked).
func (h *Hook) initFile() (clean bool, err error) {
	err = h.db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			if k, _ := tx.Cursor().First(); k != nil {
				return &damagedError{fmt.Errorf("not a session store (bucket %q)", k)}
			}
			for _, b := range allBuckets {
				if _, err := tx.CreateBucket(b); err != nil {
					return err
				}
			}
			meta = tx.Bucket(bucketMeta)
			if err := meta.Put(keyCheck, h.seal.seal(bucketMeta, keyCheck, checkPlaintext)); err != nil {
				return err
			}
			clean = true
		} else {
			if err := h.seal.checkKey(meta.Get(keyCheck)); err != nil {
				return err
			}
			for _, b := range allBuckets {
				if tx.Bucket(b) == nil {
					return &damagedError{fmt.Errorf("bucket %q missing", b)}
				}
			}
			clean = string(meta.Get(keyState)) == stateClosed
		}
		return meta.Put(keyState, []byte(stateOpen))
	})
	if err != nil && !errors.Is(err, ErrWrongKey) {
		var d *damagedError
		if !errors.As(err, &d) {
			err = fmt.Errorf("sessionstore: open %s: %w", h.path, err)
		}
	}
	return clean, err
}

// load reads every record. A record that does not authenticate or parse
// is dropped (and counted), a session past its expiry is dropped with its
// subscriptions and messages, and so are subscriptions and messages of a
// client the file does not hold. A client still connected when the broker
// stopped (kill -9) gets the restart as its disconnect time.
func (h *Hook) load() error {
	now := h.opts.Now().Unix()
	l := &loaded{deadlines: map[string]int64{}}
	var drop [][2][]byte // bucket, key (or client prefix for bucketClients)
	var stamp []clientRecord
	expired, invalid := 0, 0
	live := map[string]bool{} // client key prefixes
	err := h.db.View(func(tx *bolt.Tx) error {
		each := func(bucket []byte, fn func(k []byte, pt []byte) error) {
			tx.Bucket(bucket).ForEach(func(k, v []byte) error {
				pt, err := h.seal.open(bucket, k, v)
				if err == nil {
					err = fn(k, pt)
				}
				if err != nil {
					invalid++
					drop = append(drop, [2][]byte{bucket, bytes.Clone(k)})
				}
				return nil
			})
		}
		each(bucketClients, func(k, pt []byte) error {
			r, err := decodeClient(pt)
			if err != nil {
				return err
			}
			if r.Disconnected == 0 {
				r.Disconnected = now
				stamp = append(stamp, r)
			}
			deadline := r.Disconnected + h.expiry(r.Client)
			if deadline < now {
				expired++
				drop = append(drop, [2][]byte{nil, bytes.Clone(k)})
				return nil
			}
			live[string(k)] = true
			l.deadlines[r.Client.ID] = deadline
			l.clients = append(l.clients, r.Client)
			return nil
		})
		each(bucketSubs, func(k, pt []byte) error {
			s, err := decodeSubscription(pt)
			if err != nil || len(k) < idLen {
				return errRecord
			}
			if live[string(k[:idLen])] {
				l.subs = append(l.subs, s)
			} else {
				drop = append(drop, [2][]byte{bucketSubs, bytes.Clone(k)})
			}
			return nil
		})
		each(bucketInflight, func(k, pt []byte) error {
			m, err := decodeMessage(pt)
			if err != nil || len(k) < idLen {
				return errRecord
			}
			if live[string(k[:idLen])] {
				l.inflight = append(l.inflight, m)
			} else {
				drop = append(drop, [2][]byte{bucketInflight, bytes.Clone(k)})
			}
			return nil
		})
		each(bucketRetained, func(k, pt []byte) error {
			m, err := decodeMessage(pt)
			if err != nil {
				return err
			}
			l.retained = append(l.retained, m)
			return nil
		})
		each(bucketJournal, func(k, pt []byte) error {
			m, err := decodeMessage(pt)
			if err != nil {
				return err
			}
			l.journal = append(l.journal, journalEntry{bytes.Clone(k), m})
			return nil
		})
		return nil
	})
	if err != nil {
		return &damagedError{err}
	}
	if len(drop) > 0 || len(stamp) > 0 {
		if err := h.db.Update(func(tx *bolt.Tx) error {
			for _, d := range drop {
				var err error
				if d[0] == nil {
					err = deleteSession(tx, d[1])
				} else {
					err = tx.Bucket(d[0]).Delete(d[1])
				}
				if err != nil {
					return err
				}
			}
			for _, r := range stamp {
				if live[string(h.seal.clientKey(r.Client.ID))] {
					if err := h.put(tx, bucketClients, h.seal.clientKey(r.Client.ID), r); err != nil {
						return err
					}
				}
			}
			return nil
		}); err != nil {
			return fmt.Errorf("sessionstore: open %s: %w", h.path, err)
		}
	}
	if invalid > 0 {
		h.log.Error("session file: records that do not authenticate under the master key were dropped (changed outside m2mguard, or damaged)",
			"file", h.path, "records", invalid)
	}
	h.log.Info("session store", "file", h.path, "sessions", len(l.clients), "subscriptions", len(l.subs),
		"messages", len(l.inflight), "retained", len(l.retained), "journal", len(l.journal), "expired_sessions", expired)
	h.loaded = l
	return nil
}

// The decoders of records (JSON, as mochi's storage types define it). A
// record has authenticated before it is decoded: it was written by this
// store. They still check what the store relies on.

func decodeClient(pt []byte) (clientRecord, error) {
	var r clientRecord
	if err := json.Unmarshal(pt, &r); err != nil || r.Client.ID == "" || r.Disconnected < 0 {
		return clientRecord{}, errRecord
	}
	return r, nil
}

func decodeSubscription(pt []byte) (storage.Subscription, error) {
	var s storage.Subscription
	if err := json.Unmarshal(pt, &s); err != nil || s.Client == "" || s.Filter == "" || s.Qos > 2 {
		return storage.Subscription{}, errRecord
	}
	return s, nil
}

func decodeMessage(pt []byte) (storage.Message, error) {
	var m storage.Message
	if err := json.Unmarshal(pt, &m); err != nil || m.FixedHeader.Qos > 2 {
		return storage.Message{}, errRecord
	}
	return m, nil
}

// expiry is how long the session of c outlives its connection, in
// seconds: the server's maximum, or less if an MQTT 5 client asked for
// less (what the CONNACK told it).
func (h *Hook) expiry(c storage.Client) int64 {
	max := int64(h.server.Options.Capabilities.MaximumSessionExpiryInterval)
	if c.ProtocolVersion == 5 && c.Properties.SessionExpiryIntervalFlag && int64(c.Properties.SessionExpiryInterval) < max {
		return int64(c.Properties.SessionExpiryInterval)
	}
	return max
}

// StoredClients returns the sessions to restore (mochi's Serve).
func (h *Hook) StoredClients() ([]storage.Client, error) {
	if h.loaded == nil {
		return nil, nil
	}
	v := h.loaded.clients
	h.loaded.clients = nil
	return v, nil
}

// StoredSubscriptions returns the subscriptions of the restored sessions.
func (h *Hook) StoredSubscriptions() ([]storage.Subscription, error) {
	if h.loaded == nil {
		return nil, nil
	}
	return h.loaded.subs, nil
}

// StoredInflightMessages returns the messages in flight of the restored
// sessions, with their packet ids.
func (h *Hook) StoredInflightMessages() ([]storage.Message, error) {
	if h.loaded == nil {
		return nil, nil
	}
	return h.loaded.inflight, nil
}

// StoredRetainedMessages returns the retained messages.
func (h *Hook) StoredRetainedMessages() ([]storage.Message, error) {
	if h.loaded == nil {
		return nil, nil
	}
	return h.loaded.retained, nil
}

// StoredSysInfo returns the counts of what was restored, which mochi sets
// its counters to ($SYS); nothing else of $SYS is stored.
func (h *Hook) StoredSysInfo() (storage.SystemInfo, error) {
	var v storage.SystemInfo
	if h.loaded != nil {
		v.Subscriptions = int64(len(h.loaded.subs))
		v.Inflight = int64(len(h.loaded.inflight))
		v.Retained = int64(len(h.loaded.retained))
	}
	return v, nil
}

// OnStarted runs once mochi has restored the sessions: it notes when each
// restored session expires and publishes the journal again (messages
// acknowledged before an unclean stop, perhaps not yet in every
// subscriber's session; a subscriber may receive one twice, as QoS 1
// allows).
func (h *Hook) OnStarted() {
	l := h.loaded
	h.loaded = nil
	if l == nil {
		return
	}
	h.restoredMu.Lock()
	for id, deadline := range l.deadlines {
		if cl, ok := h.server.Clients.Get(id); ok && cl.Net.Conn == nil && !cl.Net.Inline {
			h.restored[id] = restoredSession{cl: cl, deadline: deadline}
		}
	}
	h.restoredMu.Unlock()
	h.replayJournal(l.journal)
	h.started.Store(true)
}

func (h *Hook) replayJournal(entries []journalEntry) {
	if len(entries) == 0 {
		return
	}
	inline, ok := h.server.Clients.Get(mqtt.InlineClientId)
	if !ok || !inline.Net.Inline {
		h.log.Error("session store: the journal cannot be published again without mochi's inline client (mqtt.Options.InlineClient): its messages are dropped",
			"file", h.path, "messages", len(entries))
		inline = nil
	}
	replayed := 0
	for _, e := range entries {
		if inline == nil {
			key := e.key
			h.update("journal-dropped", func(tx *bolt.Tx) error { return tx.Bucket(bucketJournal).Delete(key) })
			continue
		}
		pk := e.msg.ToPacket()
		pk.FixedHeader.Retain = false // a retained message is stored as such
		if pk.PacketID == 0 {
			pk.PacketID = 1
		}
		if err := h.server.InjectPacket(inline, pk); err != nil {
			h.log.Warn("session store: a journal message could not be published again", "err", err)
		} else {
			replayed++
		}
		key := e.key
		h.update("journal-replayed", func(tx *bolt.Tx) error { return tx.Bucket(bucketJournal).Delete(key) })
	}
	if replayed > 0 {
		h.log.Warn("session store: messages acknowledged before an unclean stop published again to their subscribers",
			"messages", replayed)
	}
}

// forgetRestored: the session was resumed or expired.
func (h *Hook) forgetRestored(clientID string) {
	h.restoredMu.Lock()
	delete(h.restored, clientID)
	h.restoredMu.Unlock()
}

// expireRestored ends the restored sessions whose expiry, counted from
// their disconnect before the restart, has passed, as mochi's own expiry
// does (which counts from the restart): it tells OnExpire, removes the
// session from the server and its subscriptions from the topic index, and
// deletes its records. Like mochi's, it cannot exclude a login resuming
// the session in the same instant.
func (h *Hook) expireRestored() {
	now := h.opts.Now().Unix()
	var due []*mqtt.Client
	h.restoredMu.Lock()
	for id, r := range h.restored {
		cur, ok := h.server.Clients.Get(id)
		switch {
		case !ok || cur != r.cl:
			delete(h.restored, id) // resumed, or expired by mochi
		case r.deadline < now:
			delete(h.restored, id)
			due = append(due, r.cl)
		}
	}
	h.restoredMu.Unlock()
	for _, cl := range due {
		if cur, ok := h.server.Clients.Get(cl.ID); !ok || cur != cl {
			continue
		}
		if h.opts.OnExpire != nil {
			h.opts.OnExpire(cl)
		}
		h.server.Clients.Delete(cl.ID)
		h.server.UnsubscribeClient(cl)
		cid := h.seal.clientKey(cl.ID)
		h.update("expire", func(tx *bolt.Tx) error { return deleteSession(tx, cid) })
		h.log.Debug("restored session expired", "client", cl.ID)
	}
}

// journalStale is the age at which a journal entry is the leftover of a
// PUBACK that could not be written (journal.go).
const journalStale = time.Minute

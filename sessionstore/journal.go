package sessionstore

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"

	"github.com/mochi-mqtt/server/v2/hooks/storage"
	bolt "go.etcd.io/bbolt"
)

// The journal holds each QoS 1 or 2 message with a persistent subscriber
// from just before mochi acknowledges it until mochi has handed it to every
// subscriber's session (events.go, OnPublish). Its cost is one write per
// such message: an entry handed on is not deleted at once but with the
// next journal write (of any publisher), or by the store's loop within
// SyncEvery, or at a clean close. So after a kill -9 the start publishes
// again, besides any message that may not have reached its subscribers,
// the messages of the last moments before the kill that had: a subscriber
// may receive them twice, as QoS 1 allows.
//
// Keys are the publisher's hashed ClientID and 8 random bytes, never
// reused: a late delete cannot hit a newer entry.

// journalKey returns a fresh key for an entry of clientID.
func (h *Hook) journalKey(clientID string) []byte {
	return binary.BigEndian.AppendUint64(h.seal.clientKey(clientID), rand.Uint64())
}

// journalDone queues the deletion of an entry handed on.
func (h *Hook) journalDone(key []byte) {
	h.doneMu.Lock()
	h.done = append(h.done, key)
	h.doneMu.Unlock()
}

// takeJournalDone returns the entries to delete and forgets them.
func (h *Hook) takeJournalDone() [][]byte {
	h.doneMu.Lock()
	defer h.doneMu.Unlock()
	done := h.done
	h.done = nil
	return done
}

// flushJournal deletes the entries handed on (the loop, and Close).
func (h *Hook) flushJournal() {
	if done := h.takeJournalDone(); len(done) > 0 {
		h.update("journal-done", func(tx *bolt.Tx) error { return deleteKeys(tx, bucketJournal, done) })
	}
}

func deleteKeys(tx *bolt.Tx, bucket []byte, keys [][]byte) error {
	b := tx.Bucket(bucket)
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// dropStaleJournal removes the entries of messages mochi never handed on
// because the PUBACK could not be written (mochi then neither publishes
// the message nor reports it; the publisher sends it again): those older
// than journalStale. It waits until the journal read at start has been
// published again.
func (h *Hook) dropStaleJournal() {
	if !h.started.Load() || !h.has(bucketJournal, nil) {
		return
	}
	cutoff := h.opts.Now().Add(-journalStale).Unix()
	h.update("journal-stale", func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketJournal)
		var stale [][]byte
		b.ForEach(func(k, v []byte) error {
			var m storage.Message
			pt, err := h.seal.open(bucketJournal, k, v)
			if err == nil {
				m, err = decodeMessage(pt)
			}
			if err != nil || m.Sent < cutoff {
				stale = append(stale, bytes.Clone(k))
			}
			return nil
		})
		return deleteKeys(tx, bucketJournal, stale)
	})
}

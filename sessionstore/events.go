package sessionstore

import (
	"encoding/json"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
	bolt "go.etcd.io/bbolt"
)

// The events mochi reports, each written as it happens. Clean sessions
// are never stored: their events cost nothing (or one read where a
// persistent session of the same ClientID may have left records).

// OnSessionEstablished stores the client of a persistent session, as
// connected. A clean start removes what a persistent session of the same
// ClientID left (mochi has already dropped its subscriptions and messages).
func (h *Hook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	cid := h.seal.clientKey(cl.ID)
	h.clientMu.Lock()
	defer h.clientMu.Unlock()
	h.forgetRestored(cl.ID)
	if !persistent(cl) {
		if h.has(bucketClients, cid) {
			h.update("session-clean", func(tx *bolt.Tx) error { return deleteSession(tx, cid) })
		}
		return
	}
	rec := newClientRecord(cl, 0)
	h.update("session", func(tx *bolt.Tx) error { return h.put(tx, bucketClients, cid, rec) })
}

// OnDisconnect records when a persistent session's connection ended
// (expiry counts from then), or removes a session that ends with its
// connection. A connection whose session another has taken over leaves the
// records to that one: mochi may report its end before it marks it taken
// over, so the store checks that cl is still the server's client for the
// ClientID, under the lock the new connection's OnSessionEstablished
// takes: the new connection's record is always written last.
func (h *Hook) OnDisconnect(cl *mqtt.Client, _ error, expire bool) {
	if cl.Net.Conn == nil || cl.Net.Inline {
		return // a session restored at start (mochi's loadClients): nothing changed
	}
	h.journalOpen.Delete(cl) // a PUBLISH whose PUBACK failed: the entry goes stale (journal.go)
	h.clientMu.Lock()
	defer h.clientMu.Unlock()
	if cur, ok := h.server.Clients.Get(cl.ID); cl.IsTakenOver() || !ok || cur != cl {
		return
	}
	cid := h.seal.clientKey(cl.ID)
	if expire {
		if h.has(bucketClients, cid) { // a v5 session whose expiry the DISCONNECT set to 0
			h.update("session-end", func(tx *bolt.Tx) error { return deleteSession(tx, cid) })
		}
		return
	}
	rec := newClientRecord(cl, h.opts.Now().Unix())
	h.update("disconnect", func(tx *bolt.Tx) error { return h.put(tx, bucketClients, cid, rec) })
}

// OnClientExpired removes a session mochi expired, with its subscriptions
// and messages (mochi's bolt hook leaves them, and a restart would
// subscribe a client that no longer exists).
func (h *Hook) OnClientExpired(cl *mqtt.Client) {
	cid := h.seal.clientKey(cl.ID)
	h.forgetRestored(cl.ID)
	h.update("expire", func(tx *bolt.Tx) error { return deleteSession(tx, cid) })
}

// OnSubscribed stores the granted subscriptions of a persistent session;
// a refused one (reason code 0x80 and above) is not a subscription. A
// terminal subscribes again at every login: a subscription stored as it
// is costs a read, not a write.
func (h *Hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	if !persistent(cl) {
		return
	}
	type record struct{ key, plaintext []byte }
	var subs []record
	for i, f := range pk.Filters {
		if i >= len(reasonCodes) || reasonCodes[i] >= 0x80 {
			continue
		}
		pt, err := json.Marshal(storage.Subscription{T: storage.SubscriptionKey, Client: cl.ID, Filter: f.Filter, Qos: reasonCodes[i],
			Identifier: f.Identifier, NoLocal: f.NoLocal, RetainHandling: f.RetainHandling, RetainAsPublished: f.RetainAsPublished})
		if err != nil {
			continue
		}
		key := h.seal.subKey(cl.ID, f.Filter)
		if !h.holds(bucketSubs, key, pt) {
			subs = append(subs, record{key, pt})
		}
	}
	if len(subs) == 0 {
		return
	}
	h.update("subscribe", func(tx *bolt.Tx) error {
		for _, s := range subs {
			if err := tx.Bucket(bucketSubs).Put(s.key, h.seal.seal(bucketSubs, s.key, s.plaintext)); err != nil {
				return err
			}
		}
		return nil
	})
}

// OnUnsubscribed removes subscriptions of a persistent session (also those
// mochi removes when a clean start discards the session).
func (h *Hook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if !persistent(cl) || len(pk.Filters) == 0 {
		return
	}
	h.update("unsubscribe", func(tx *bolt.Tx) error {
		for _, f := range pk.Filters {
			if err := tx.Bucket(bucketSubs).Delete(h.seal.subKey(cl.ID, f.Filter)); err != nil {
				return err
			}
		}
		return nil
	})
}

// OnQosPublish stores a message in flight to a persistent session (queued
// while it is offline, or sent and not yet acknowledged), with its packet
// id, and the QoS 2 states that replace it. The PUBACK mochi keeps for a
// moment while it acknowledges a QoS 1 PUBLISH is not stored.
func (h *Hook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, _ int64, _ int) {
	switch pk.FixedHeader.Type {
	case packets.Publish, packets.Pubrec, packets.Pubrel:
	default:
		return
	}
	if !persistent(cl) {
		return
	}
	msg := newMessage(cl.ID, pk)
	key := h.seal.packetKey(cl.ID, pk.PacketID)
	h.update("qos-publish", func(tx *bolt.Tx) error { return h.put(tx, bucketInflight, key, msg) })
}

// OnQosComplete removes an acknowledged message. mochi reports the end of
// its own PUBACK to a QoS 1 PUBLISH here too, which was never stored: that
// packet is the one mochi built (Created set), whereas an acknowledgement
// read from the client has no creation time.
func (h *Hook) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	if pk.FixedHeader.Type == packets.Puback && pk.Created != 0 || !persistent(cl) {
		return
	}
	key := h.seal.packetKey(cl.ID, pk.PacketID)
	h.update("qos-complete", func(tx *bolt.Tx) error { return tx.Bucket(bucketInflight).Delete(key) })
}

// OnQosDropped removes a message dropped from a session: expired, refused
// by the client, cleared with a discarded session, or dropped by another
// hook (hook.Options.Storage). When a connection takes a session over,
// mochi drops the old connection's messages after copying them to the new
// one, under the same keys: those stay.
func (h *Hook) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	if cl.IsTakenOver() || !persistent(cl) {
		return
	}
	key := h.seal.packetKey(cl.ID, pk.PacketID)
	h.update("qos-drop", func(tx *bolt.Tx) error { return tx.Bucket(bucketInflight).Delete(key) })
}

// OnRetainMessage stores a retained message, or removes it (r == -1: an
// empty retained message clears the topic). mochi calls it before it
// acknowledges the PUBLISH.
func (h *Hook) OnRetainMessage(cl *mqtt.Client, pk packets.Packet, r int64) {
	key := h.seal.retainedKey(pk.TopicName)
	if r == -1 {
		h.update("retain-clear", func(tx *bolt.Tx) error { return tx.Bucket(bucketRetained).Delete(key) })
		return
	}
	msg := newMessage(cl.ID, pk)
	msg.T, msg.Client, msg.PacketID, msg.Sent = storage.RetainedKey, "", 0, 0
	h.update("retain", func(tx *bolt.Tx) error { return h.put(tx, bucketRetained, key, msg) })
}

// OnRetainedExpired removes a retained message that expired.
func (h *Hook) OnRetainedExpired(topic string) {
	key := h.seal.retainedKey(topic)
	h.update("retain-expire", func(tx *bolt.Tx) error { return tx.Bucket(bucketRetained).Delete(key) })
}

// OnPublish writes a QoS 1 or 2 message from a client to the journal
// before mochi acknowledges it, when a persistent session subscribes to
// its topic: mochi sends the PUBACK first and hands the message to the
// subscribers' sessions after, so a kill -9 in between would lose an
// acknowledged message. Added after the M2M1 hook, the store sees the
// message as it is delivered (an uplink opened) and never one the hook
// dropped. The same transaction deletes the entries of messages handed on
// since the last one (journal.go).
func (h *Hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Qos == 0 || cl.Net.Inline || !h.persistentSubscriber(pk.TopicName) {
		return pk, nil
	}
	msg := newMessage(cl.ID, pk)
	msg.T, msg.Client = "journal", ""
	key := h.journalKey(cl.ID)
	done := h.takeJournalDone()
	h.update("journal", func(tx *bolt.Tx) error {
		if err := deleteKeys(tx, bucketJournal, done); err != nil {
			return err
		}
		return h.put(tx, bucketJournal, key, msg)
	})
	h.journalOpen.Store(cl, key)
	return pk, nil
}

// OnPublished: mochi has handed the message to its subscribers; its
// journal entry is deleted with the next write of the journal.
func (h *Hook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if pk.FixedHeader.Qos == 0 || cl.Net.Inline {
		return
	}
	if key, ok := h.journalOpen.LoadAndDelete(cl); ok {
		h.journalDone(key.([]byte))
	}
}

// persistentSubscriber reports whether a client with a persistent session
// subscribes to topic.
func (h *Hook) persistentSubscriber(topic string) bool {
	subs := h.server.Topics.Subscribers(topic)
	for id := range subs.Subscriptions {
		if cl, ok := h.server.Clients.Get(id); ok && persistent(cl) {
			return true
		}
	}
	for _, group := range subs.Shared {
		for id := range group {
			if cl, ok := h.server.Clients.Get(id); ok && persistent(cl) {
				return true
			}
		}
	}
	return false
}

package hook

import (
	"log/slog"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Writes to a client never happen on a goroutine that someone waits for.
// mochi's Client.WritePacket holds the client's write lock while it blocks
// in net.Conn.Write, and a client that stops reading blocks it for as long
// as the connection lives (no deadline with keepalive 0). A hook write from
// the read goroutine would stop the session's reading; a DISCONNECT
// written from a login (takeover) or an admin call would hang them. So:
//
//   - key-topic messages go through a small per-session queue, drained by
//     a writer goroutine that exists only while there is something to write
//     (an idle terminal costs no goroutine); a write blocked for
//     WriteTimeout closes the connection at once (Client.Stop: no
//     DISCONNECT could be written), which ends the write;
//   - every other connection the hook ends goes through endConnection, which
//     gives mochi's DisconnectClient DisconnectTimeout and then closes the
//     socket without the write lock (Client.Stop), which also unblocks any
//     write stuck on it.

// maxKeyQueue bounds the key-topic messages waiting for one session. A
// genuine terminal has at most a few at a time (sk or err at login, cfg or
// acc, done, an err for a mistaken control message); more means it floods
// control messages without reading its key topic, and the session ends.
const maxKeyQueue = 16

// writer does every write of the hook to a client and every end of a
// connection, by the rules above. Its goroutines belong to the hook's
// crew; event logs its security events.
type writer struct {
	crew              *crew
	server            *mqtt.Server // DisconnectClient
	event             func(level slog.Level, name string, attrs ...any)
	writeTimeout      time.Duration // Options.WriteTimeout
	disconnectTimeout time.Duration // Options.DisconnectTimeout
	// afterKey runs on the writer goroutine after each key message is
	// written: what waited for the session key goes out (inherit.go).
	afterKey func(cl *mqtt.Client, s *session)
}

// sendKey queues a message for the terminal's key topic; it goes out once
// the terminal has subscribed there, after the ones queued before it.
// Platform messages go straight to the one connection they are for (QoS
// 0), never through the topic tree. sendKey never blocks on the
// connection.
func (w *writer) sendKey(cl *mqtt.Client, s *session, payload []byte) {
	if payload == nil || s.ending.Load() {
		return
	}
	s.mu.Lock()
	if len(s.keyq) >= maxKeyQueue {
		s.mu.Unlock()
		w.endSession(cl, s, "key-queue-full", packets.ErrPendingClientWritesExceeded)
		return
	}
	s.keyq = append(s.keyq, payload)
	start := s.subscribed && !s.writing
	s.writing = s.writing || start
	s.mu.Unlock()
	if start {
		w.startWriter(cl, s)
	}
}

// keySubscribed sends the queued messages once the key topic is subscribed.
func (w *writer) keySubscribed(cl *mqtt.Client, s *session) {
	s.mu.Lock()
	s.subscribed = true
	start := len(s.keyq) > 0 && !s.writing
	s.writing = s.writing || start
	s.mu.Unlock()
	if start {
		w.startWriter(cl, s)
	}
}

// startWriter starts the goroutine that drains s.keyq; the caller has set
// s.writing. Once the hook has stopped, the queue is dropped instead.
func (w *writer) startWriter(cl *mqtt.Client, s *session) {
	if !w.crew.spawn(func() { w.writeKeys(cl, s) }) {
		s.mu.Lock()
		s.keyq, s.writing = nil, false
		s.mu.Unlock()
	}
}

// writeKeys sends the queued key messages in order and returns when the
// queue is empty (or the connection closed). If the session is to end
// after them (closeAfterKeys), it ends it then.
func (w *writer) writeKeys(cl *mqtt.Client, s *session) {
	for {
		s.mu.Lock()
		if len(s.keyq) == 0 || cl.Closed() {
			s.keyq, s.writing = nil, false
			code := s.closeCode
			s.mu.Unlock()
			if code != nil {
				w.endConnection(cl, *code)
			}
			return
		}
		payload := s.keyq[0]
		s.keyq[0] = nil
		s.keyq = s.keyq[1:]
		s.mu.Unlock()
		w.writeKey(cl, s, payload)
		if w.afterKey != nil {
			w.afterKey(cl, s)
		}
	}
}

// writeKey writes one key message. If the write has not returned after
// WriteTimeout, the terminal is not reading: the connection is closed,
// which ends the write.
func (w *writer) writeKey(cl *mqtt.Client, s *session, payload []byte) {
	err := w.write(cl, s, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName:   s.keyTopic,
		Payload:     payload,
	})
	if err != nil && !cl.Closed() {
		w.event(slog.LevelWarn, "key_delivery_failed", "sn", s.sn, "err", err.Error())
	}
}

// write writes pk to cl from a writer goroutine: a key-topic message, or
// downlink a resumed session queued for its key (releaseAfterKey), which
// belongs to the key's delivery. If the write has not returned after
// WriteTimeout, the client is not reading: the session ends
// (key-write-stalled) and the connection is closed, which ends the write.
func (w *writer) write(cl *mqtt.Client, s *session, pk packets.Packet) error {
	stalled := time.AfterFunc(w.writeTimeout, func() {
		w.markEnding(s, "key-write-stalled")
		cl.Stop(packets.ErrPendingClientWritesExceeded) // nothing can be written to it: no DISCONNECT
	})
	defer stalled.Stop()
	return cl.WritePacket(pk)
}

// endSession ends the session's connection for reason (event
// session_ended), once; later calls do nothing. It returns within
// DisconnectTimeout.
func (w *writer) endSession(cl *mqtt.Client, s *session, reason string, code packets.Code) {
	if !w.markEnding(s, reason) {
		return
	}
	w.endConnection(cl, code)
}

// endSessionAfterKeys ends the session like endSession, but only after
// the key messages queued so far are written, if the terminal is
// subscribed to its key topic (a done must reach it before the close).
func (w *writer) endSessionAfterKeys(cl *mqtt.Client, s *session, reason string, code packets.Code) {
	if !w.markEnding(s, reason) {
		return
	}
	s.mu.Lock()
	later := s.writing
	if later {
		s.closeCode = &code
	}
	s.mu.Unlock()
	if !later {
		w.endConnection(cl, code)
	}
}

func (w *writer) markEnding(s *session, reason string) bool {
	return w.markEndingBy(s, reason, "")
}

// markEndingBy is markEnding for an operator's action: the session_ended
// event names the operator (the admin API's named token) when there is one.
func (w *writer) markEndingBy(s *session, reason, operator string) bool {
	if !s.ending.CompareAndSwap(false, true) {
		return false
	}
	s.endReason.Store(&reason)
	level := slog.LevelWarn
	switch reason {
	case "credentials-changed", "key-expired", "administrative", "taken-over", RevokeDisabled, RevokeDeleted, RevokeRekeyed:
		level = slog.LevelInfo
	}
	who, name := "sn", s.sn
	if s.kind != kindTerminal {
		who, name = "app", s.app.Name
	}
	if operator != "" {
		w.event(level, "session_ended", who, name, "reason", reason, "operator", operator)
	} else {
		w.event(level, "session_ended", who, name, "reason", reason)
	}
	return true
}

// endConnection closes cl's connection with code and returns within
// DisconnectTimeout: mochi's DisconnectClient writes a DISCONNECT (which
// blocks on a client that does not read) in an owned goroutine; if it has
// not finished in time, Client.Stop closes the socket without the write
// lock, which also ends that write and so the goroutine.
func (w *writer) endConnection(cl *mqtt.Client, code packets.Code) {
	if cl.Closed() {
		return
	}
	done := make(chan struct{})
	if !w.crew.spawn(func() {
		defer close(done)
		_ = w.server.DisconnectClient(cl, code) // returns code itself once stopped
	}) {
		cl.Stop(code)
		return
	}
	t := time.NewTimer(w.disconnectTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		cl.Stop(code)
	}
}

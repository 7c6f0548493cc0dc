package codec

import (
	"crypto/cipher"
	"encoding/binary"
	"unsafe"
)

// Direction is the direction of a data envelope; it selects the nonce
// prefix, so the two directions of one session key never share a nonce.
type Direction uint8

// The directions.
const (
	Uplink   Direction = iota + 1 // terminal → platform, nonce "UPLK" || be64(seq)
	Downlink                      // platform → terminal, nonce "DNLK" || be64(seq)
)

// Envelope layout: 0x01 || be64(seq) || AES-256-GCM(ks, nonce, plaintext, aad = topic).
const (
	EnvelopeVersion  = 0x01
	envelopeHeader   = 1 + 8
	EnvelopeOverhead = envelopeHeader + gcmTagSize // bytes an envelope adds to its plaintext
)

func (d Direction) nonce(seq uint64) [gcmNonceSize]byte {
	var n [gcmNonceSize]byte
	if d == Uplink {
		copy(n[:], "UPLK")
	} else {
		copy(n[:], "DNLK")
	}
	binary.BigEndian.PutUint64(n[4:], seq)
	return n
}

// Seal appends the envelope of plaintext, sent in direction dir with
// sequence number seq (from 1, one more per message) on topic, to dst.
// aead is the session's AES-256-GCM from NewAEAD(ks).
func Seal(dst []byte, aead cipher.AEAD, dir Direction, seq uint64, topic string, plaintext []byte) []byte {
	dst = append(dst, EnvelopeVersion)
	dst = binary.BigEndian.AppendUint64(dst, seq)
	nonce := dir.nonce(seq)
	return aead.Seal(dst, nonce[:], plaintext, topicBytes(topic))
}

// Open checks and decrypts an envelope received on topic and appends the
// plaintext to dst. It returns the sequence number; the caller decides, with
// a Window, whether that number is fresh.
func Open(dst []byte, aead cipher.AEAD, dir Direction, topic string, envelope []byte) (seq uint64, plaintext []byte, err error) {
	if len(envelope) < EnvelopeOverhead || envelope[0] != EnvelopeVersion {
		return 0, nil, malformed("envelope", "want 0x01, be64(seq), ciphertext and tag")
	}
	seq = binary.BigEndian.Uint64(envelope[1:envelopeHeader])
	if seq == 0 {
		return 0, nil, malformed("envelope.seq", "sequence numbers start at 1")
	}
	nonce := dir.nonce(seq)
	plaintext, err = aead.Open(dst, nonce[:], envelope[envelopeHeader:], topicBytes(topic))
	if err != nil {
		return 0, nil, &Error{Field: "envelope", Reason: "authentication failed", Err: ErrDecrypt}
	}
	return seq, plaintext, nil
}

// topicBytes views a topic as bytes without copying; GCM only reads its
// additional data.
func topicBytes(topic string) []byte {
	return unsafe.Slice(unsafe.StringData(topic), len(topic))
}

// WindowSize is how far back an envelope may arrive out of order.
const WindowSize = 64

// Verdict is what a Window says of a sequence number.
type Verdict uint8

// The verdicts.
const (
	Fresh    Verdict = iota // not seen: deliver it
	Repeated                // accepted before: acknowledge, do not deliver again
	TooOld                  // older than the window: drop
)

// Window is the anti-replay window of one direction of one session: it
// remembers the highest accepted sequence number and which of the 63 before
// it were accepted. The zero Window accepts any sequence number from 1.
type Window struct {
	top  uint64 // highest accepted seq; 0 before the first
	seen uint64 // bit i set: top-i was accepted
}

// Check classifies seq without recording it.
func (w *Window) Check(seq uint64) Verdict {
	switch {
	case seq > w.top:
		return Fresh
	case w.top-seq >= WindowSize:
		return TooOld
	case w.seen&(1<<(w.top-seq)) != 0:
		return Repeated
	}
	return Fresh
}

// Accept records seq as accepted. Call it only after the envelope opened
// and Check said Fresh.
func (w *Window) Accept(seq uint64) {
	if seq > w.top {
		shift := seq - w.top
		if shift >= WindowSize {
			w.seen = 0
		} else {
			w.seen <<= shift
		}
		w.seen |= 1
		w.top = seq
		return
	}
	if w.top-seq < WindowSize {
		w.seen |= 1 << (w.top - seq)
	}
}

// Top returns the highest sequence number accepted so far.
func (w *Window) Top() uint64 { return w.top }

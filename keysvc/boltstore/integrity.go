package boltstore

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
)

// The integrity head. Each record is sealed on its own (see Store), which
// stops a value from being forged or moved to another key, but not from
// being replaced by an older sealed copy of itself, deleted, or put back
// after a delete: the version in the authenticated data is read from the
// value itself. The head closes that. It is one sealed record in the meta
// bucket, rewritten in the same bbolt transaction as every write and
// delete, holding
//
//	counter  the last version issued, as the head's own sealed version.
//	         Every record write takes the next one, so no (bucket, key,
//	         version) is ever sealed twice.
//	count    the number of terminals and of apps.
//	sum      the XOR, over every record, of its element
//	         HMAC-SHA256(kInt, uvarint len(bucket) bucket uvarint len(key) key value)
//	         where value is the whole stored value (version, nonce,
//	         ciphertext, tag) and kInt = HKDF-SHA256(master key, info
//	         "m2mguard boltstore integrity v2").
//
// Open recomputes count and sum in one pass over the records (Verify does
// the same at any time) and compares. A record rolled back, deleted, put
// back, copied over another or added, alone or with others, changes the
// sum; without the master key nobody can compute the element of a value or
// seal a head holding another sum. A head rolled back alone no longer
// matches the records. XOR is enough here: elements are keyed, the sum is
// only ever stored sealed, and a key occurs at most once per bucket.
//
// Not detected: the whole file replaced by an earlier copy of itself
// (records and head together, or a subset of the records of a file written
// before the head existed). Such a copy is consistent, and nothing inside
// the file can tell it from the current state; only an anchor outside the
// file could.

// headFormat is the first byte of the head's plaintext.
const headFormat = 1

// headSize is the size of the head's plaintext: format, two counts, sum.
const headSize = 1 + 8 + 8 + sha256.Size

// recordBuckets are the buckets whose records the head covers, in the order
// of head.count.
var recordBuckets = [2][]byte{bucketTerminals, bucketApps}

// integrityInfo is the HKDF info of kInt.
const integrityInfo = "m2mguard boltstore integrity v2"

// head is the integrity head. It is comparable: a batch that changed
// nothing leaves it equal.
type head struct {
	counter uint64    // last version issued
	count   [2]uint64 // records in recordBuckets[i]
	sum     [sha256.Size]byte
}

func (h *head) xor(e [sha256.Size]byte) { subtle.XORBytes(h.sum[:], h.sum[:], e[:]) }

// countOf returns the count of the record bucket named bucket.
func (h *head) countOf(bucket []byte) *uint64 {
	if string(bucket) == string(bucketApps) {
		return &h.count[1]
	}
	return &h.count[0]
}

// matches reports whether the records found are those h describes; the
// sum is compared in constant time.
func (h *head) matches(found *head) bool {
	return h.count == found.count && hmac.Equal(h.sum[:], found.sum[:])
}

// encode returns the plaintext of h (the counter is the sealed version).
func (h *head) encode() []byte {
	b := make([]byte, 0, headSize)
	b = append(b, headFormat)
	b = binary.BigEndian.AppendUint64(b, h.count[0])
	b = binary.BigEndian.AppendUint64(b, h.count[1])
	return append(b, h.sum[:]...)
}

var errHead = errors.New("corrupt integrity head")

// decodeHead parses the plaintext of a head; counter is the version it was
// sealed with.
func decodeHead(b []byte, counter uint64) (head, error) {
	if len(b) != headSize || b[0] != headFormat {
		return head{}, errHead
	}
	h := head{counter: counter}
	h.count[0] = binary.BigEndian.Uint64(b[1:])
	h.count[1] = binary.BigEndian.Uint64(b[9:])
	copy(h.sum[:], b[17:])
	return h, nil
}

// macer computes elements. Not safe for concurrent use.
type macer struct {
	h   hash.Hash
	pre []byte
	out [sha256.Size]byte // Sum's buffer: a local one would escape
}

func newMacer(kInt []byte) *macer { return &macer{h: hmac.New(sha256.New, kInt)} }

// element returns the element of the stored value v of bucket/key.
func (m *macer) element(bucket, key, v []byte) [sha256.Size]byte {
	m.pre = binary.AppendUvarint(m.pre[:0], uint64(len(bucket)))
	m.pre = append(m.pre, bucket...)
	m.pre = binary.AppendUvarint(m.pre, uint64(len(key)))
	m.pre = append(m.pre, key...)
	m.h.Reset()
	m.h.Write(m.pre)
	m.h.Write(v)
	m.h.Sum(m.out[:0])
	return m.out
}

// ErrTampered is matched (errors.Is) by the *TamperError that Open and
// Verify return when the file is not as this store left it.
var ErrTampered = errors.New("boltstore: store file changed outside m2mguard")

// TamperError says why the integrity check failed and how to accept the
// file as it is, after checking it: Options.Reseal = ResealCode.
type TamperError struct {
	// Path is the store file.
	Path string
	// Reason is what the check found, for the operator (key names, never
	// values).
	Reason string
	// ResealCode is the Options.Reseal value that accepts exactly this
	// state of the file.
	ResealCode string
	// StaleReseal: Options.Reseal was set, but not to ResealCode.
	StaleReseal bool
}

func (e *TamperError) Error() string {
	stale := ""
	if e.StaleReseal {
		stale = " (the reseal code given does not fit this state of the file: mistyped, or the file changed since)"
	}
	return fmt.Sprintf("integrity check failed: %s. Records or the integrity head were rolled back, replaced, "+
		"put back after a delete or deleted by something other than m2mguard, or the file is damaged. "+
		"Restore the file from a backup you trust; or, if you have checked the records and accept "+
		"them as they are now, reseal it once: reseal code %s%s", e.Reason, e.ResealCode, stale)
}

// Is makes errors.Is(err, ErrTampered) true.
func (e *TamperError) Is(target error) bool { return target == ErrTampered }

// resealCode is the code that accepts this state of the file: a keyed
// digest of what the records are (found) and of the stored key check and
// head bytes as they are. Left in place, it accepts nothing else: any later
// change to a record, or the head a reseal writes, changes it.
func resealCode(kInt []byte, found *head, keyCheck, storedHead []byte) string {
	m := hmac.New(sha256.New, kInt)
	b := []byte("m2mguard boltstore reseal v1\x00")
	b = binary.BigEndian.AppendUint64(b, found.count[0])
	b = binary.BigEndian.AppendUint64(b, found.count[1])
	b = append(b, found.sum[:]...)
	b = binary.AppendUvarint(b, uint64(len(keyCheck)))
	b = append(b, keyCheck...)
	b = binary.AppendUvarint(b, uint64(len(storedHead)))
	b = append(b, storedHead...)
	m.Write(b)
	return hex.EncodeToString(m.Sum(nil)[:8])
}

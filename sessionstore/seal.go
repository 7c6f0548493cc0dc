package sessionstore

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash"
	"sync"
)

// The file holds nothing in clear but bbolt's own structure. Every value
// is sealed with AES-256-GCM under a key derived from the master key, with
// the bucket and the record's key as associated data, so that a value
// cannot be forged, altered or moved to another record:
//
//	value = nonce(12) || GCM(JSON record, aad = "m2mguard sessions v1" 0x00 bucket 0x00 key)
//
// Record keys are keyed hashes (HMAC-SHA256 under a second derived key,
// truncated to 16 bytes) of the ClientID, topic filter and topic name, so
// that the file shows neither serial numbers nor topics, only how many
// records there are and their sizes:
//
//	clients   cid(ClientID)
//	subs      cid(ClientID) || fid(filter)
//	inflight  cid(ClientID) || be16(packet id)
//	journal   cid(publisher's ClientID) || be16(its packet id)
//	retained  tid(topic)
//
// The records of one client share the prefix cid(ClientID): deleting a
// session is one range delete per bucket.

var (
	sealInfo = []byte("m2mguard sessionstore v1 seal")
	keysInfo = []byte("m2mguard sessionstore v1 record keys")
	aadTag   = []byte("m2mguard sessions v1\x00")
	// checkPlaintext is sealed into meta/check when the file is created:
	// a master key that does not open it is the wrong key.
	checkPlaintext = []byte("m2mguard sessionstore master key check v1")
)

// idLen is the length of a hashed ClientID, filter or topic in a key.
const idLen = 16

// Domain separation of the hashed names.
const (
	domainClient = 'c'
	domainFilter = 'f'
	domainTopic  = 't'
)

// maxValue bounds a stored value before it is opened: the largest MQTT
// packet mochi accepts (256 MiB) plus the record's envelope. A larger
// value is not a record of this store.
const maxValue = 256<<20 + 64<<10

var errRecord = errors.New("sessionstore: record does not authenticate under the master key")

// sealer seals and opens values and hashes names into keys. It is safe
// for concurrent use.
type sealer struct {
	aead cipher.AEAD
	macs sync.Pool // of hash.Hash: HMAC-SHA256 under the key-naming key
}

func newSealer(masterKey []byte) (*sealer, error) {
	kSeal, err := hkdf.Key(sha256.New, masterKey, nil, string(sealInfo), 32)
	if err != nil {
		return nil, err
	}
	kKeys, err := hkdf.Key(sha256.New, masterKey, nil, string(keysInfo), 32)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(kSeal)
	clear(kSeal)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	s := &sealer{aead: aead}
	s.macs.New = func() any { return hmac.New(sha256.New, kKeys) }
	return s, nil
}

func aad(bucket, key []byte) []byte {
	a := make([]byte, 0, len(aadTag)+len(bucket)+1+len(key))
	a = append(a, aadTag...)
	a = append(a, bucket...)
	a = append(a, 0)
	return append(a, key...)
}

// seal returns the stored form of plaintext at bucket/key.
func (s *sealer) seal(bucket, key, plaintext []byte) []byte {
	out := make([]byte, 12, 12+len(plaintext)+s.aead.Overhead())
	if _, err := rand.Read(out); err != nil {
		panic("sessionstore: crypto/rand failed: " + err.Error())
	}
	return s.aead.Seal(out, out, plaintext, aad(bucket, key))
}

// open authenticates and decrypts the value stored at bucket/key into a
// fresh buffer (bbolt's memory is valid only inside its transaction).
func (s *sealer) open(bucket, key, value []byte) ([]byte, error) {
	if len(value) < 12+s.aead.Overhead() || len(value) > maxValue {
		return nil, errRecord
	}
	pt, err := s.aead.Open(nil, value[:12], value[12:], aad(bucket, key))
	if err != nil {
		return nil, errRecord
	}
	return pt, nil
}

// name appends the hashed name of (domain, s) to b.
func (s *sealer) name(b []byte, domain byte, name string) []byte {
	m := s.macs.Get().(hash.Hash)
	m.Reset()
	m.Write([]byte{domain})
	m.Write([]byte(name))
	var sum [sha256.Size]byte
	m.Sum(sum[:0])
	s.macs.Put(m)
	return append(b, sum[:idLen]...)
}

func (s *sealer) clientKey(clientID string) []byte {
	return s.name(make([]byte, 0, idLen), domainClient, clientID)
}

func (s *sealer) subKey(clientID, filter string) []byte {
	return s.name(s.name(make([]byte, 0, 2*idLen), domainClient, clientID), domainFilter, filter)
}

func (s *sealer) packetKey(clientID string, packetID uint16) []byte {
	return binary.BigEndian.AppendUint16(s.name(make([]byte, 0, idLen+2), domainClient, clientID), packetID)
}

func (s *sealer) retainedKey(topic string) []byte {
	return s.name(make([]byte, 0, idLen), domainTopic, topic)
}

// checkKey verifies that the master key opens a file's key check.
func (s *sealer) checkKey(sealed []byte) error {
	pt, err := s.open(bucketMeta, keyCheck, sealed)
	if err != nil || !hmac.Equal(pt, checkPlaintext) {
		return ErrWrongKey
	}
	return nil
}

// ErrWrongKey: the master key does not open the session file (another
// key, or another file).
var ErrWrongKey = errors.New("sessionstore: the master key does not open this file (wrong key or wrong file)")

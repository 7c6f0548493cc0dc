package replay

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// MaxSNLen is the longest serial number a claim can carry (SPEC section 3:
// 1 to 16 characters).
const MaxSNLen = 16

// A record is one claim on disk, recordSize bytes:
//
//	0      'C'
//	1      version (1)
//	2      length of sn, 1..16
//	3      0
//	4:20   sn, padded with zero bytes
//	20:28  nonce, big-endian
//	28:36  until, unix nanoseconds, big-endian
//	36:40  CRC-32C of bytes 0:36, big-endian
const (
	recordSize    = 40
	recordMagic   = 'C'
	recordVersion = 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// key is a claimed pair as a map key without pointers (the garbage
// collector never scans the claims).
type key struct {
	sn    [MaxSNLen]byte
	n     uint8 // length of sn
	nonce uint64
}

// ErrInvalid: a claim with a serial number that is empty or longer than
// MaxSNLen, or an until that is not in the future.
var ErrInvalid = errors.New("replay: invalid claim")

func newKey(sn string, nonce uint64) (key, error) {
	if len(sn) == 0 || len(sn) > MaxSNLen {
		return key{}, fmt.Errorf("%w: serial number of %d bytes (want 1 to %d)", ErrInvalid, len(sn), MaxSNLen)
	}
	k := key{n: uint8(len(sn)), nonce: nonce}
	copy(k.sn[:], sn)
	return k, nil
}

func encodeRecord(k key, until int64) [recordSize]byte {
	var b [recordSize]byte
	b[0], b[1], b[2] = recordMagic, recordVersion, k.n
	copy(b[4:20], k.sn[:k.n])
	binary.BigEndian.PutUint64(b[20:28], k.nonce)
	binary.BigEndian.PutUint64(b[28:36], uint64(until))
	binary.BigEndian.PutUint32(b[36:40], crc32.Checksum(b[:36], castagnoli))
	return b
}

// parseRecord decodes one record; ok is false unless b is exactly a record
// as encodeRecord writes it.
func parseRecord(b []byte) (k key, until int64, ok bool) {
	if len(b) != recordSize || b[0] != recordMagic || b[1] != recordVersion || b[3] != 0 {
		return key{}, 0, false
	}
	n := int(b[2])
	if n == 0 || n > MaxSNLen {
		return key{}, 0, false
	}
	for _, c := range b[4+n : 20] {
		if c != 0 {
			return key{}, 0, false
		}
	}
	if binary.BigEndian.Uint32(b[36:40]) != crc32.Checksum(b[:36], castagnoli) {
		return key{}, 0, false
	}
	k.n = uint8(n)
	copy(k.sn[:], b[4:4+n])
	k.nonce = binary.BigEndian.Uint64(b[20:28])
	return k, int64(binary.BigEndian.Uint64(b[28:36])), true
}

// readRecords calls fn for every valid record in r and returns the number
// of bytes skipped. A torn or corrupt record is skipped a byte at a time
// until a valid record starts again, so that one bad record (the torn tail
// of a write cut by a power loss, with later appends behind it) costs only
// itself.
func readRecords(r io.Reader, fn func(k key, until int64)) (skipped int64, err error) {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		b, err := br.Peek(recordSize)
		if len(b) < recordSize {
			if errors.Is(err, io.EOF) {
				return skipped + int64(len(b)), nil
			}
			return skipped, err
		}
		if k, until, ok := parseRecord(b); ok {
			fn(k, until)
			br.Discard(recordSize)
			continue
		}
		br.Discard(1)
		skipped++
	}
}

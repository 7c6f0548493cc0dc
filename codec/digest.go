package codec

import (
	"crypto/hmac"
	"crypto/md5"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
)

// Lengths of the padded identity fields in a digest (SPEC section 2).
const (
	imeiPad = 16
	imsiPad = 15
)

// appendDigest appends D(alg, pwd, S(a, b, prefix), ts) as lower-case hex.
func appendDigest(dst []byte, alg Alg, pwd []byte, id Identity, a, b string, prefix []byte, ts uint32) []byte {
	var sum [sha256.Size]byte
	return hex.AppendEncode(dst, rawDigest(&sum, alg, pwd, id, a, b, prefix, ts))
}

// rawDigest computes the bytes of D(alg, pwd, S(a, b, prefix), ts) into
// out and returns them (16 for md5, 32 for hs256):
//
//	md5:   MD5(S || be32(ts) || pad(IMEI,16) || pad(IMSI,15) || pwd)
//	hs256: HMAC-SHA256(pwd, S || be32(ts) || pad(IMEI,16) || pad(IMSI,15))
//
// with S = a + "\n" + b + "\n" + prefix. It allocates nothing for the
// messages of logins and of most control messages (see digestBufSize).
func rawDigest(out *[sha256.Size]byte, alg Alg, pwd []byte, id Identity, a, b string, prefix []byte, ts uint32) []byte {
	// The message is built after room for HMAC's inner pad (hs256) or is
	// followed by the password (md5): one buffer, hashed at once.
	n := sha256.BlockSize + len(a) + 1 + len(b) + 1 + len(prefix) + 4 + imeiPad + imsiPad + len(pwd)
	var stack [digestBufSize]byte
	buf := stack[:0]
	if n > len(stack) {
		buf = make([]byte, 0, n)
	}
	start := 0
	if alg != MD5 {
		start = sha256.BlockSize
		buf = buf[:start]
	}
	msg := append(buf, a...)
	msg = append(msg, '\n')
	msg = append(msg, b...)
	msg = append(msg, '\n')
	msg = append(msg, prefix...)
	msg = binary.BigEndian.AppendUint32(msg, ts)
	msg = appendPadded(msg, id.IMEI, imeiPad)
	msg = appendPadded(msg, id.IMSI, imsiPad)
	var d []byte
	if alg == MD5 {
		msg = append(msg, pwd...)
		*(*[md5.Size]byte)(out[:md5.Size]) = md5.Sum(msg)
		d = out[:md5.Size]
	} else {
		*out = hmacSHA256(pwd, msg)
		d = out[:]
	}
	clear(msg) // it holds the password, or the inner pad derived from it
	return d
}

// digestBufSize is the stack buffer of rawDigest: enough for every login
// token and for control messages up to about 400 bytes (an sk message is
// about 200); longer ones take a buffer from the heap.
const digestBufSize = 512

// hmacSHA256 returns HMAC-SHA256(key, buf[sha256.BlockSize:]) (RFC 2104).
// The first sha256.BlockSize bytes of buf are room for the inner pad,
// which it writes there: so that the inner hash is one call on one buffer.
// It is crypto/hmac's result (TestHMACSHA256 compares them) without its
// five allocations per call (two hash states, two pads, the state), which
// were a quarter of a login's.
func hmacSHA256(key, buf []byte) [sha256.Size]byte {
	var k [sha256.BlockSize]byte
	if len(key) > sha256.BlockSize {
		sum := sha256.Sum256(key)
		copy(k[:], sum[:])
	} else {
		copy(k[:], key)
	}
	for i := range k {
		buf[i] = k[i] ^ 0x36
	}
	inner := sha256.Sum256(buf)
	var outer [sha256.BlockSize + sha256.Size]byte
	for i := range k {
		outer[i] = k[i] ^ 0x5c
	}
	copy(outer[sha256.BlockSize:], inner[:])
	sum := sha256.Sum256(outer[:])
	clear(k[:])
	clear(outer[:])
	clear(buf[:sha256.BlockSize])
	return sum
}

func appendPadded(dst []byte, s string, n int) []byte {
	dst = append(dst, s...)
	for i := len(s); i < n; i++ {
		dst = append(dst, 0)
	}
	return dst
}

// digestEqual computes the expected digest and compares it with the hex
// digest got in constant time (for a given length).
func digestEqual(got string, alg Alg, pwd []byte, id Identity, a, b string, prefix []byte, ts uint32) bool {
	var wantBuf, gotBuf [sha256.Size]byte
	gotRaw, ok := decodeHex(gotBuf[:0], got)
	want := rawDigest(&wantBuf, alg, pwd, id, a, b, prefix, ts)
	return hmac.Equal(want, gotRaw) && ok
}

// decodeHex appends the bytes of the lower-case hex string s to dst; it
// reports false for an odd length or a character that is not lower-case hex.
func decodeHex(dst []byte, s string) ([]byte, bool) {
	ok := len(s)%2 == 0
	for i := 0; i+1 < len(s); i += 2 {
		hi, ok1 := fromHex(s[i])
		lo, ok2 := fromHex(s[i+1])
		ok = ok && ok1 && ok2
		dst = append(dst, hi<<4|lo)
	}
	return dst, ok
}

func fromHex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}

// BasicKeyDigest returns bkd(alg, bk, bkexp), the digest of the basic key
// that a terminal sends at login to prove which key it holds:
// md5: hex MD5(bk || be32(bkexp)); hs256: hex of the first 16 bytes of
// SHA-256(bk || be32(bkexp)). Both are 32 hex digits.
func BasicKeyDigest(alg Alg, bk []byte, bkexp uint32) string {
	var raw [16]byte
	return hex.EncodeToString(rawBKD(&raw, alg, bk, bkexp))
}

// BasicKeyDigestEqual reports, in constant time, whether got is
// bkd(alg, bk, bkexp).
func BasicKeyDigestEqual(got string, alg Alg, bk []byte, bkexp uint32) bool {
	var want, gotBuf [16]byte
	gotRaw, ok := decodeHex(gotBuf[:0], got)
	return hmac.Equal(rawBKD(&want, alg, bk, bkexp), gotRaw) && ok
}

func rawBKD(out *[16]byte, alg Alg, bk []byte, bkexp uint32) []byte {
	var in [BasicKeySize + 4]byte
	msg := append(in[:0], bk...)
	msg = binary.BigEndian.AppendUint32(msg, bkexp)
	if alg == MD5 {
		*out = md5.Sum(msg)
	} else {
		s := sha256.Sum256(msg)
		copy(out[:], s[:16])
	}
	clear(msg)
	return out[:]
}

// validBKD reports whether s has the form of a bkd: 32 lower-case hex digits.
func validBKD(s string) bool { return len(s) == 32 && isLowerHex(s) }

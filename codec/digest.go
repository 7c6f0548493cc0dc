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

// appendDigest appends D(alg, pwd, S(a, b, prefix), ts) as lower-case hex:
//
//	md5:   MD5(S || be32(ts) || pad(IMEI,16) || pad(IMSI,15) || pwd)
//	hs256: HMAC-SHA256(pwd, S || be32(ts) || pad(IMEI,16) || pad(IMSI,15))
//
// with S = a + "\n" + b + "\n" + prefix.
func appendDigest(dst []byte, alg Alg, pwd []byte, id Identity, a, b string, prefix []byte, ts uint32) []byte {
	n := len(a) + 1 + len(b) + 1 + len(prefix) + 4 + imeiPad + imsiPad
	msg := make([]byte, 0, n+len(pwd))
	msg = append(msg, a...)
	msg = append(msg, '\n')
	msg = append(msg, b...)
	msg = append(msg, '\n')
	msg = append(msg, prefix...)
	msg = binary.BigEndian.AppendUint32(msg, ts)
	msg = appendPadded(msg, id.IMEI, imeiPad)
	msg = appendPadded(msg, id.IMSI, imsiPad)

	var sum [sha256.Size]byte
	var raw []byte
	switch alg {
	case MD5:
		msg = append(msg, pwd...)
		s := md5.Sum(msg)
		raw = append(sum[:0], s[:]...)
	default:
		mac := hmac.New(sha256.New, pwd)
		mac.Write(msg)
		raw = mac.Sum(sum[:0])
	}
	clear(msg) // it may hold the password
	return hex.AppendEncode(dst, raw)
}

func appendPadded(dst []byte, s string, n int) []byte {
	dst = append(dst, s...)
	for i := len(s); i < n; i++ {
		dst = append(dst, 0)
	}
	return dst
}

// digestEqual computes the expected digest and compares it with got in
// constant time (for a given length).
func digestEqual(got string, alg Alg, pwd []byte, id Identity, a, b string, prefix []byte, ts uint32) bool {
	var buf [2 * sha256.Size]byte
	want := appendDigest(buf[:0], alg, pwd, id, a, b, prefix, ts)
	return hmac.Equal(want, []byte(got))
}

// BasicKeyDigest returns bkd(alg, bk, bkexp), the digest of the basic key
// that a terminal sends at login to prove which key it holds:
// md5: hex MD5(bk || be32(bkexp)); hs256: hex of the first 16 bytes of
// SHA-256(bk || be32(bkexp)). Both are 32 hex digits.
func BasicKeyDigest(alg Alg, bk []byte, bkexp uint32) string {
	var buf [32]byte
	return string(appendBKD(buf[:0], alg, bk, bkexp))
}

func appendBKD(dst []byte, alg Alg, bk []byte, bkexp uint32) []byte {
	var in [BasicKeySize + 4]byte
	msg := append(in[:0], bk...)
	msg = binary.BigEndian.AppendUint32(msg, bkexp)
	var sum []byte
	if alg == MD5 {
		s := md5.Sum(msg)
		sum = s[:]
	} else {
		s := sha256.Sum256(msg)
		sum = s[:16]
	}
	clear(in[:])
	return hex.AppendEncode(dst, sum)
}

// BasicKeyDigestEqual reports, in constant time, whether got is
// bkd(alg, bk, bkexp).
func BasicKeyDigestEqual(got string, alg Alg, bk []byte, bkexp uint32) bool {
	var buf [32]byte
	return hmac.Equal(appendBKD(buf[:0], alg, bk, bkexp), []byte(got))
}

// validBKD reports whether s has the form of a bkd: 32 lower-case hex digits.
func validBKD(s string) bool { return len(s) == 32 && isLowerHex(s) }

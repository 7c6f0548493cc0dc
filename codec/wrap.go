package codec

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"fmt"
	"io"
	"slices"
	"strings"
)

const (
	gcmNonceSize = 12
	gcmTagSize   = 16
)

var b64 = base64.RawURLEncoding.Strict()

// decodeB64 decodes canonical unpadded base64url. Unlike the encoding
// package alone it refuses '\r' and '\n' (which the decoder skips), so that
// only one spelling of a value parses.
func decodeB64(s []byte) ([]byte, bool) {
	if !b64Chars(s) {
		return nil, false
	}
	out := make([]byte, b64.DecodedLen(len(s)))
	n, err := b64.Decode(out, s)
	if err != nil {
		return nil, false
	}
	return out[:n], true
}

func b64Chars[T string | []byte](s T) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// b64Chunk is how many base64 characters checkB64 and encodeB64 handle at
// a time: whole groups of 4, so that each chunk decodes on its own.
const b64Chunk = 64

// checkB64 reports whether s is canonical unpadded base64url, as
// decodeB64 decides it, and how many bytes it decodes to, without
// allocating: it decodes s a chunk at a time into the stack.
func checkB64(s string) (int, bool) {
	if !b64Chars(s) {
		return 0, false
	}
	var in [b64Chunk]byte
	var out [b64Chunk / 4 * 3]byte
	n := 0
	for len(s) > 0 {
		k := copy(in[:], s)
		m, err := b64.Decode(out[:], in[:k])
		if err != nil {
			return 0, false
		}
		n += m
		s = s[k:]
	}
	return n, true
}

// encodeB64 is b64.EncodeToString with one allocation, the string's,
// where EncodeToString makes a buffer and then the string.
func encodeB64(src []byte) string {
	var sb strings.Builder
	sb.Grow(b64.EncodedLen(len(src)))
	var out [b64Chunk]byte
	for len(src) > 0 {
		n := min(len(src), b64Chunk/4*3)
		b64.Encode(out[:], src[:n])
		sb.Write(out[:b64.EncodedLen(n)])
		src = src[n:]
	}
	return sb.String()
}

// NewAEAD returns AES-256-GCM under a 32-byte key. Create it once per key
// and reuse it: GCM setup costs more than sealing a short message.
func NewAEAD(key []byte) (cipher.AEAD, error) {
	if len(key) != 32 {
		return nil, &Error{Field: "key", Reason: "want 32 bytes for AES-256", Err: ErrKey}
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("m2m1: %w", err)
	}
	return cipher.NewGCM(block)
}

// Wrap returns wrap(key, plaintext, aad) = b64(nonce12 || AES-256-GCM(key,
// nonce12, plaintext, aad)) with a nonce read from rand (crypto/rand.Reader
// in production; a fixed reader reproduces the test vectors).
func Wrap(key, plaintext, aad []byte, rand io.Reader) (string, error) {
	return wrap(key, plaintext, rand, len(aad), func(dst []byte) []byte { return append(dst, aad...) })
}

// wrap is Wrap with the aad written by appendAAD (at most aadLen bytes)
// into the buffer of the sealed bytes, after them, so that one allocation
// serves both: Seal fills exactly nonce, ciphertext and tag, and the aad
// is only read.
func wrap(key, plaintext []byte, rand io.Reader, aadLen int, appendAAD func([]byte) []byte) (string, error) {
	aead, err := NewAEAD(key)
	if err != nil {
		return "", err
	}
	sealedLen := gcmNonceSize + len(plaintext) + gcmTagSize
	buf := make([]byte, gcmNonceSize, sealedLen+aadLen)
	aad := appendAAD(buf[sealedLen:sealedLen])
	if _, err := io.ReadFull(rand, buf); err != nil {
		return "", fmt.Errorf("m2m1: wrap nonce: %w", err)
	}
	sealed := aead.Seal(buf, buf[:gcmNonceSize], plaintext, aad)
	return encodeB64(sealed), nil
}

// Unwrap reverses Wrap. It fails with ErrDecrypt if the key or aad is
// wrong or the value was altered.
func Unwrap(key []byte, wrapped string, aad []byte) ([]byte, error) {
	if len(wrapped) > MaxControlLen {
		return nil, tooLong("wrapped", MaxControlLen)
	}
	aead, err := NewAEAD(key)
	if err != nil {
		return nil, err
	}
	raw, ok := decodeB64([]byte(wrapped))
	if !ok || len(raw) < gcmNonceSize+gcmTagSize {
		return nil, malformed("wrapped", "want unpadded base64url of nonce, ciphertext and tag")
	}
	plain, err := aead.Open(nil, raw[:gcmNonceSize], raw[gcmNonceSize:], aad)
	if err != nil {
		return nil, &Error{Field: "wrapped", Reason: "authentication failed", Err: ErrDecrypt}
	}
	return plain, nil
}

// sessionKeyAAD is "M2M1.sk." + sn + "." + sid.
func sessionKeyAAD(sn string, sid ID) []byte { return appendIDAAD(nil, "sk", sn, sid) }

// changeAAD is "M2M1.cfg." + sn + "." + rid.
func changeAAD(sn string, rid ID) []byte { return appendIDAAD(nil, "cfg", sn, rid) }

// appendIDAAD appends "M2M1." + label + "." + sn + "." + id, the aad of a
// value wrapped for one terminal's message, of idAADLen bytes.
func appendIDAAD(dst []byte, label, sn string, id ID) []byte {
	dst = slices.Grow(dst, idAADLen(label, sn))
	dst = append(dst, Version...)
	dst = append(dst, '.')
	dst = append(dst, label...)
	dst = append(dst, '.')
	dst = append(dst, sn...)
	dst = append(dst, '.')
	return id.appendTo(dst)
}

func idAADLen(label, sn string) int { return len(Version) + 1 + len(label) + 1 + len(sn) + 1 + 16 }

// wrapForID wraps plaintext under key with the aad of appendIDAAD.
func wrapForID(key, plaintext []byte, label, sn string, id ID, rand io.Reader) (string, error) {
	return wrap(key, plaintext, rand, idAADLen(label, sn), func(dst []byte) []byte { return appendIDAAD(dst, label, sn, id) })
}

// WrapSessionKey wraps the session key ks under the basic key bk for the
// sk message of terminal sn with session id sid.
func WrapSessionKey(bk []byte, sn string, sid ID, ks []byte, rand io.Reader) (string, error) {
	if len(ks) != SessionKeySize {
		return "", &Error{Field: "ks", Reason: "want 32 bytes", Err: ErrKey}
	}
	return wrapForID(bk, ks, "sk", sn, sid, rand)
}

// UnwrapSessionKey returns the session key of an sk message.
func UnwrapSessionKey(bk []byte, sn string, sid ID, wrapped string) ([]byte, error) {
	ks, err := Unwrap(bk, wrapped, sessionKeyAAD(sn, sid))
	if err != nil {
		return nil, err
	}
	if len(ks) != SessionKeySize {
		return nil, &Error{Field: "ks", Reason: "want 32 bytes", Err: ErrKey}
	}
	return ks, nil
}

// WrapParams wraps the new credentials of change rid under the current
// basic key bk, for the cfg message.
func WrapParams(bk []byte, sn string, rid ID, p Params, rand io.Reader) (string, error) {
	text, err := p.AppendTo(nil)
	if err != nil {
		return "", err
	}
	defer clear(text)
	return wrapForID(bk, text, "cfg", sn, rid, rand)
}

// UnwrapParams returns the new credentials of a cfg message.
func UnwrapParams(bk []byte, sn string, rid ID, wrapped string) (Params, error) {
	text, err := Unwrap(bk, wrapped, changeAAD(sn, rid))
	if err != nil {
		return Params{}, err
	}
	defer clear(text)
	return ParseParams(text)
}

package codec

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"fmt"
	"io"
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
	for _, c := range s {
		if !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return nil, false
		}
	}
	out := make([]byte, b64.DecodedLen(len(s)))
	n, err := b64.Decode(out, s)
	if err != nil {
		return nil, false
	}
	return out[:n], true
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
	aead, err := NewAEAD(key)
	if err != nil {
		return "", err
	}
	buf := make([]byte, gcmNonceSize, gcmNonceSize+len(plaintext)+gcmTagSize)
	if _, err := io.ReadFull(rand, buf); err != nil {
		return "", fmt.Errorf("m2m1: wrap nonce: %w", err)
	}
	sealed := aead.Seal(buf, buf[:gcmNonceSize], plaintext, aad)
	return b64.EncodeToString(sealed), nil
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
func sessionKeyAAD(sn string, sid ID) []byte {
	return sid.appendTo([]byte("M2M1.sk." + sn + "."))
}

// changeAAD is "M2M1.cfg." + sn + "." + rid.
func changeAAD(sn string, rid ID) []byte {
	return rid.appendTo([]byte("M2M1.cfg." + sn + "."))
}

// WrapSessionKey wraps the session key ks under the basic key bk for the
// sk message of terminal sn with session id sid.
func WrapSessionKey(bk []byte, sn string, sid ID, ks []byte, rand io.Reader) (string, error) {
	if len(ks) != SessionKeySize {
		return "", &Error{Field: "ks", Reason: "want 32 bytes", Err: ErrKey}
	}
	return Wrap(bk, ks, sessionKeyAAD(sn, sid), rand)
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
	return Wrap(bk, text, changeAAD(sn, rid), rand)
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

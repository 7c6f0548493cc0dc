package fleet

import (
	"errors"
	"fmt"
	"strings"
)

// ErrKey is wrapped by the errors of EscapeKey and UnescapeKey.
var ErrKey = errors.New("fleet: key")

// MaxKeyInput is the longest string (in bytes) EscapeKey accepts: its
// escaped form stays well inside NATS's 4 KiB control line. Longer
// ClientIDs cannot be registered in the directory.
const MaxKeyInput = 1024

// EscapeKey turns an arbitrary non-empty string (a ClientID, a serial
// number) into a JetStream KV key, reversibly: ASCII letters, digits and
// '-' stay as they are, every other byte becomes '_' and two upper-case hex
// digits. The result holds no '.', so it is one token of a subject and
// never an empty or wildcard one.
func EscapeKey(s string) (string, error) {
	if s == "" {
		return "", fmt.Errorf("%w: empty", ErrKey)
	}
	if len(s) > MaxKeyInput {
		return "", fmt.Errorf("%w: %d bytes, at most %d", ErrKey, len(s), MaxKeyInput)
	}
	if plainKey(s) {
		return s, nil
	}
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	b.Grow(len(s) * 3)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if keepByte(c) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('_')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&0xF])
	}
	return b.String(), nil
}

// UnescapeKey reverses EscapeKey; it refuses anything EscapeKey cannot
// have produced, so that every key has one string.
func UnescapeKey(k string) (string, error) {
	if k == "" {
		return "", fmt.Errorf("%w: empty", ErrKey)
	}
	if len(k) > 3*MaxKeyInput { // longer than any escaped key: not parsed
		return "", fmt.Errorf("%w: too long", ErrKey)
	}
	if plainKey(k) {
		if len(k) > MaxKeyInput {
			return "", fmt.Errorf("%w: too long", ErrKey)
		}
		return k, nil
	}
	var b strings.Builder
	b.Grow(len(k))
	for i := 0; i < len(k); i++ {
		c := k[i]
		if keepByte(c) {
			b.WriteByte(c)
			continue
		}
		if c != '_' || i+2 >= len(k) {
			return "", fmt.Errorf("%w: invalid escaped key", ErrKey)
		}
		hi, lo := unhex(k[i+1]), unhex(k[i+2])
		if hi < 0 || lo < 0 {
			return "", fmt.Errorf("%w: invalid escaped key", ErrKey)
		}
		v := byte(hi<<4 | lo)
		if keepByte(v) {
			return "", fmt.Errorf("%w: needless escape", ErrKey)
		}
		b.WriteByte(v)
		i += 2
	}
	if b.Len() > MaxKeyInput {
		return "", fmt.Errorf("%w: too long", ErrKey)
	}
	return b.String(), nil
}

func plainKey(s string) bool {
	for i := 0; i < len(s); i++ {
		if !keepByte(s[i]) {
			return false
		}
	}
	return true
}

func keepByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-'
}

// unhex decodes an upper-case hex digit, -1 for anything else.
func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

package codec

import (
	"strconv"
	"strings"
)

// Version is the first field of every M2M1 token.
const Version = "M2M1"

// Bounds of docs/SPEC.md section 8 and of the fields of section 1.
const (
	MaxPasswordLen = 200  // a CONNECT password token
	MaxControlLen  = 1024 // a control payload or an SMS text
	MaxSNLen       = 16
	MinPasswordLen = 8  // an access password (import rules of section 1)
	MaxPwdLen      = 64 // an access password
	BasicKeySize   = 32 // bk, in bytes
	SessionKeySize = 32 // ks, in bytes
	Never          = 4294967295
)

// Alg is the digest algorithm of a terminal: md5 (the patent's formula) or
// hs256 (HMAC-SHA256, the default for new terminals).
type Alg uint8

// The algorithms. The zero Alg is invalid, so a forgotten field never
// silently means md5.
const (
	MD5 Alg = iota + 1
	HS256
)

// String returns the wire name, "md5" or "hs256".
func (a Alg) String() string {
	switch a {
	case MD5:
		return "md5"
	case HS256:
		return "hs256"
	}
	return "invalid"
}

// ParseAlg parses the wire name of an algorithm.
func ParseAlg(s string) (Alg, error) {
	switch s {
	case "md5":
		return MD5, nil
	case "hs256":
		return HS256, nil
	}
	return 0, malformed("alg", `want "md5" or "hs256"`)
}

// digestHexLen is the length of a digest field in hex.
func (a Alg) digestHexLen() int {
	if a == MD5 {
		return 32
	}
	return 64
}

func (a Alg) valid() bool { return a == MD5 || a == HS256 }

// ID is a 64-bit identifier written as 16 lower-case hex digits: a login or
// control nonce, a session id (sid) or a change id (rid).
type ID uint64

// String returns the 16 hex digits.
func (id ID) String() string {
	var buf [16]byte
	return string(id.appendTo(buf[:0]))
}

func (id ID) appendTo(dst []byte) []byte {
	const digits = "0123456789abcdef"
	for shift := 60; shift >= 0; shift -= 4 {
		dst = append(dst, digits[(id>>uint(shift))&0xf])
	}
	return dst
}

// ParseID parses 16 lower-case hex digits.
func ParseID(s string) (ID, error) { return parseID("id", s) }

func parseID(field, s string) (ID, error) {
	if len(s) != 16 || !isLowerHex(s) {
		return 0, malformed(field, "want 16 lower-case hex digits")
	}
	v, err := strconv.ParseUint(s, 16, 64)
	if err != nil {
		return 0, malformed(field, "want 16 lower-case hex digits")
	}
	return ID(v), nil
}

// Identity is what binds a terminal: its serial number and the IMEI and
// IMSI of the patent's stored correspondence. The digest covers all three.
type Identity struct {
	SN   string // 1–16 of [A-Za-z0-9]
	IMEI string // 14–16 digits
	IMSI string // 6–15 digits
}

// Validate reports the first field of the identity that is malformed.
func (id Identity) Validate() error {
	if err := ValidateSN(id.SN); err != nil {
		return err
	}
	if !isDigits(id.IMEI, 14, 16) {
		return malformed("imei", "want 14 to 16 digits")
	}
	if !isDigits(id.IMSI, 6, 15) {
		return malformed("imsi", "want 6 to 15 digits")
	}
	return nil
}

// Username returns the CONNECT username, IMEI + ":" + IMSI.
func (id Identity) Username() string { return id.IMEI + ":" + id.IMSI }

// ValidateSN reports whether s is a serial number: 1–16 of [A-Za-z0-9].
func ValidateSN(s string) error {
	if len(s) < 1 || len(s) > MaxSNLen {
		return malformed("sn", "want 1 to 16 characters")
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return malformed("sn", "want only [A-Za-z0-9]")
		}
	}
	return nil
}

// ParseUsername splits a CONNECT username into IMEI and IMSI.
func ParseUsername(username string) (imei, imsi string, err error) {
	imei, imsi, ok := strings.Cut(username, ":")
	if !ok {
		return "", "", malformed("username", `want IMEI ":" IMSI`)
	}
	if !isDigits(imei, 14, 16) {
		return "", "", malformed("imei", "want 14 to 16 digits")
	}
	if !isDigits(imsi, 6, 15) {
		return "", "", malformed("imsi", "want 6 to 15 digits")
	}
	return imei, imsi, nil
}

// ValidatePassword reports whether p may be an access password: 8–64
// printable ASCII characters other than '.', ';' and '='.
func ValidatePassword(field string, p []byte) error {
	if len(p) < MinPasswordLen || len(p) > MaxPwdLen {
		return malformed(field, "want 8 to 64 characters")
	}
	for _, c := range p {
		if c < 0x21 || c > 0x7e || c == '.' || c == ';' || c == '=' {
			return malformed(field, "want printable ASCII without '.', ';', '=' or space")
		}
	}
	return nil
}

func isDigits(s string, min, max int) bool {
	if len(s) < min || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// parseUint32 parses a canonical decimal: no sign, no leading zeros.
func parseUint32(field, s string) (uint32, error) {
	if len(s) == 0 || len(s) > 10 || (len(s) > 1 && s[0] == '0') || !isDigits(s, 1, 10) {
		return 0, malformed(field, "want a decimal number without sign or leading zeros")
	}
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, malformed(field, "out of range for uint32")
	}
	return uint32(v), nil
}

// split cuts s at '.' into exactly len(out) fields, or reports false.
// It does not allocate.
func split(s string, out []string) bool {
	for i := range out {
		if i == len(out)-1 {
			out[i] = s
			return strings.IndexByte(s, '.') < 0
		}
		f, rest, ok := strings.Cut(s, ".")
		if !ok {
			return false
		}
		out[i], s = f, rest
	}
	return false
}

// fieldCount is the number of '.'-separated fields of s.
func fieldCount(s string) int { return strings.Count(s, ".") + 1 }

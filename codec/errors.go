package codec

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error the package returns wraps one of them, so
// callers can test with errors.Is.
var (
	// ErrMalformed: a token, field or payload is not of the form docs/SPEC.md fixes.
	ErrMalformed = errors.New("malformed")
	// ErrTooLong: the input exceeds its bound; nothing of it was parsed.
	ErrTooLong = errors.New("too long")
	// ErrDigest: a digest did not verify.
	ErrDigest = errors.New("digest mismatch")
	// ErrDecrypt: a wrapped value or envelope failed authentication.
	ErrDecrypt = errors.New("decryption failed")
	// ErrKey: a key has the wrong size.
	ErrKey = errors.New("bad key")
)

// Error describes what was wrong with an input: which field and why. It never
// carries the field's value, so it is safe to log.
type Error struct {
	Field  string // the field of docs/SPEC.md at fault, e.g. "nonce" or "params.up"
	Reason string // what was wrong with it, e.g. "want 16 lower-case hex digits"
	Err    error  // one of the sentinel errors above
}

func (e *Error) Error() string {
	if e.Field == "" {
		return fmt.Sprintf("m2m1: %s: %v", e.Reason, e.Err)
	}
	return fmt.Sprintf("m2m1: %s: %s: %v", e.Field, e.Reason, e.Err)
}

// Unwrap returns the sentinel error, for errors.Is.
func (e *Error) Unwrap() error { return e.Err }

func malformed(field, reason string) error {
	return &Error{Field: field, Reason: reason, Err: ErrMalformed}
}

func tooLong(field string, max int) error {
	return &Error{Field: field, Reason: fmt.Sprintf("longer than %d bytes", max), Err: ErrTooLong}
}

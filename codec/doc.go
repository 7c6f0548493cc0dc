// Package codec builds and parses every byte of the M2M1 profile (docs/SPEC.md):
// the login credentials of an MQTT CONNECT, the control messages on
// $m2m/<sn>/key and $m2m/<sn>/ctl, the SMS text of a credential change, the
// digests and basic-key digests, key wrapping, and the data envelope.
//
// The package does no I/O: it never touches the network, a clock or a
// store. Callers pass the time, the secrets and, where a random nonce is
// needed, the source of randomness. The hook (platform side) and the
// reference client (terminal side) both build on it, so the two cannot
// drift apart.
//
// Every parser bounds its input before looking at it (see MaxPasswordLen
// and MaxControlLen), accepts only the canonical form (lower-case hex,
// decimal without leading zeros, unpadded base64url) and returns an *Error
// naming the field and the reason, never the value. Whatever parses
// re-encodes to the same bytes. Digests are compared in constant time.
//
// The broker runs ParseLogin and Login.Verify on every CONNECT: verifying
// allocates nothing (HMAC-SHA256 is computed with sha256.Sum256 on a stack
// buffer, hmacSHA256, which its tests compare with crypto/hmac), and an sk
// message costs six allocations (TestCodecAllocs, TestDigestAllocs).
package codec

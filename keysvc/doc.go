// Package keysvc is the key service of m2mguard: the one place that knows
// terminals and their secrets (docs/SPEC.md section 1), application credentials,
// session-key issuance (section 5) and the credential-change state machine
// (section 7).
//
// Records live in a Store: keysvc/boltstore (an embedded, encrypted bbolt
// file, the default) or keysvc/vaultstore (HashiCorp Vault KV v2). The
// Service puts a bounded read cache in front of the store for the CONNECT hot
// path (Service.Lookup) and funnels every read-modify-write through one
// check-and-set helper, so that two platform nodes can never both commit
// different values.
//
// Secrets are []byte, compared in constant time, and never appear in errors
// or logs.
package keysvc

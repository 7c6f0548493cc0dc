// Package vaultstore keeps m2mguard's terminal records and application
// credentials in HashiCorp Vault's KV v2 engine: one entry per terminal,
// fields a security team can read and edit with the vault CLI, every write
// check-and-set on the entry's version so that two brokers can never both
// win a race.
//
// Layout, with the default mount "secret" and prefix "m2mguard":
//
//	secret/m2mguard/terminals/<sn>   one terminal (see the field list in record.go)
//	secret/m2mguard/apps/<name>      one application credential
//
// e.g. `vault kv get secret/m2mguard/terminals/A00MS8011390002S`.
//
// Authentication is a token (renewed with a LifetimeWatcher while it is
// renewable), AppRole (with the secret_id itself or a response-wrapping
// token of it, unwrapped once at Open) or Kubernetes (the pod's service
// account token, read again at every login); with either login method the
// store logs in again whenever renewal ends, and after two thirds of the
// TTL of a token that cannot be renewed. NewMetrics exports logins,
// renewals, the token's remaining TTL and failed requests. Errors
// wrap keysvc.ErrUnavailable (unreachable, sealed, timed out),
// keysvc.ErrForbidden (the token lacks a capability), keysvc.ErrNotFound,
// keysvc.ErrExists and keysvc.ErrConflict, and say which path failed; a
// used or foreign wrapping token is ErrWrappingToken. No error or log line
// carries a token, secret_id or service account token.
package vaultstore

// Package boltstore is the embedded keysvc.Store: one bbolt file, every
// record sealed with AES-256-GCM under a master key (see
// LoadOrCreateMasterKey), updates atomic in one transaction and
// check-and-set on a per-record version.
//
// Layout: buckets "terminals" (key sn), "apps" (key name) and "meta" (a
// sealed known value that tells a wrong master key at Open). A closed store
// answers keysvc.ErrUnavailable.
package boltstore

// Package boltstore is the embedded keysvc.Store: one bbolt file, every
// record sealed with AES-256-GCM under a master key (see
// LoadOrCreateMasterKey), updates atomic in one transaction and
// check-and-set on a per-record version.
//
// Layout: buckets "terminals" (key sn), "apps" (key name) and "meta" (a
// sealed known value that tells a wrong master key at Open, and the sealed
// integrity head that lets Open find records rolled back, deleted or put
// back by someone without the master key: see integrity.go for what it
// covers and what it cannot). A closed store answers keysvc.ErrUnavailable.
package boltstore

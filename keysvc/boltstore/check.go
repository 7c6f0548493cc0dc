package boltstore

import (
	"bytes"
	"context"
	"crypto/hmac"
	"errors"
	"fmt"
	"strings"

	bolt "go.etcd.io/bbolt"
)

// The integrity check of Open and Verify, the upgrade of a store written
// before the integrity head, and the reseal (see integrity.go).

const (
	reasonNoHead  = "the integrity head is missing"
	reasonBadHead = "the integrity head does not open under the master key"
)

// init prepares the file at Open, in Open's write transaction: a new file
// gets its key check and an empty head; a file from before the head is
// upgraded; any other is verified, and resealed if reseal is its code.
func (s *Store) init(tx *bolt.Tx, reseal string) error {
	for _, b := range [][]byte{bucketTerminals, bucketApps, bucketMeta, bucketCampaigns, bucketCampaignLists, bucketCampaignItems} {
		if _, err := tx.CreateBucketIfNotExists(b); err != nil {
			return err
		}
	}
	meta := tx.Bucket(bucketMeta)
	kc, hd := meta.Get(keyCheck), meta.Get(keyHead)
	if kc == nil && hd == nil && empty(tx) {
		return s.putMeta(tx, &head{})
	}
	format, err := s.keyCheckFormat(kc)
	if err != nil {
		return err
	}
	var te *TamperError
	if format == format1 && hd == nil {
		r, err := s.rebuild(tx, true)
		if err == nil {
			s.log.Warn("boltstore: store written before the integrity check: its records were sealed anew "+
				"and an integrity head written; changes made to the file before this start cannot be detected, "+
				"and m2mguard versions before this one can no longer open it",
				"file", s.path, "terminals", r.count[0], "apps", r.count[1])
			return nil
		}
		if !errors.As(err, &te) {
			return err
		}
	} else {
		te = s.verify(tx)
	}
	if te == nil {
		if reseal != "" {
			s.log.Warn("boltstore: a reseal code is set but the store checks out; nothing resealed: remove the setting", "file", s.path)
		}
		return nil
	}
	if reseal == "" {
		return te
	}
	if !hmac.Equal([]byte(strings.ToLower(strings.TrimSpace(reseal))), []byte(te.ResealCode)) {
		te.StaleReseal = true
		return te
	}
	r, err := s.rebuild(tx, false)
	if err != nil {
		return err
	}
	if len(r.unreadable) > 0 && r.readable == 0 {
		return fmt.Errorf("%w: reseal refused: no record opens under this master key", ErrWrongKey)
	}
	s.log.Error("boltstore: RESEALED: the integrity check failed and the reseal code accepted the records as they are now; "+
		"changes made to them before this start can no longer be detected",
		"file", s.path, "reason", te.Reason, "terminals", r.count[0], "apps", r.count[1],
		"upgraded", r.upgraded, "unreadable", nameList(r.unreadable))
	return nil
}

// empty reports whether the record buckets hold nothing.
func empty(tx *bolt.Tx) bool {
	for _, name := range recordBuckets {
		if k, _ := tx.Bucket(name).Cursor().First(); k != nil {
			return false
		}
	}
	return true
}

// keyCheckFormat returns the format the key check is sealed in (0 if v is
// nil), or ErrWrongKey if it opens in none.
func (s *Store) keyCheckFormat(v []byte) (int, error) {
	if v == nil {
		return 0, nil
	}
	for _, f := range []int{format2, format1} {
		if _, _, err := s.openFormat(f, bucketMeta, keyCheck, v); err == nil {
			return f, nil
		}
	}
	return 0, ErrWrongKey
}

// putMeta writes the key check (format 2) and the head h.
func (s *Store) putMeta(tx *bolt.Tx, h *head) error {
	if err := tx.Bucket(bucketMeta).Put(keyCheck, s.seal(bucketMeta, keyCheck, 1, checkPlaintext)); err != nil {
		return err
	}
	return s.putHead(tx, h)
}

// headOf returns the stored head, or why there is none.
func (s *Store) headOf(tx *bolt.Tx) (head, string) {
	v := tx.Bucket(bucketMeta).Get(keyHead)
	if v == nil {
		return head{}, reasonNoHead
	}
	version, pt, err := s.open(bucketMeta, keyHead, v)
	if err != nil {
		return head{}, reasonBadHead
	}
	h, err := decodeHead(pt, version)
	if err != nil {
		return head{}, reasonBadHead
	}
	return h, ""
}

// scan computes the count and sum of the records as they are stored.
func (s *Store) scan(tx *bolt.Tx) head {
	var h head
	m := newMacer(s.kInt)
	for i, name := range recordBuckets {
		c := tx.Bucket(name).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			h.count[i]++
			h.xor(m.element(name, k, v))
		}
	}
	return h
}

// verify checks the file against its head: nil, or what is wrong.
func (s *Store) verify(tx *bolt.Tx) *TamperError {
	found := s.scan(tx)
	var reason string
	h, why := s.headOf(tx)
	switch format, err := s.keyCheckFormat(tx.Bucket(bucketMeta).Get(keyCheck)); {
	case err != nil:
		reason = "the key check record does not open under the master key"
	case format == 0:
		reason = "the key check record is missing"
	case format == format1:
		reason = "the key check record is in the format of a store from before the integrity check, but the store has been upgraded"
	case why != "":
		reason = why
	case h.count != found.count:
		reason = fmt.Sprintf("terminals %d, apps %d by the integrity head; %d and %d in the file",
			h.count[0], h.count[1], found.count[0], found.count[1])
	case !h.matches(&found):
		reason = "the records are not the ones this store last wrote"
	default:
		return nil
	}
	var bad []string
	for _, name := range recordBuckets {
		c := tx.Bucket(name).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if _, _, err := s.open(name, k, v); err != nil {
				bad = append(bad, recordName(name, k))
			}
		}
	}
	if len(bad) > 0 {
		reason += "; records that do not open under the master key (copied from another key, or damaged): " + nameList(bad)
	}
	return s.tamper(tx, &found, reason)
}

// tamper returns the error for reason, with the reseal code of the file as
// it is (found is what scan returned).
func (s *Store) tamper(tx *bolt.Tx, found *head, reason string) *TamperError {
	meta := tx.Bucket(bucketMeta)
	return &TamperError{Path: s.path, Reason: reason,
		ResealCode: resealCode(s.kInt, found, meta.Get(keyCheck), meta.Get(keyHead))}
}

func recordName(bucket, key []byte) string { return fmt.Sprintf("%s/%.64q", bucket, key) }

// nameList joins the first names and says how many there are in all.
func nameList(names []string) string {
	const show = 5
	if len(names) <= show {
		return strings.Join(names, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(names[:show], ", "), len(names)-show)
}

// rebuilt is what rebuild did.
type rebuilt struct {
	count      [2]uint64 // records now
	readable   int       // records that open under the master key
	upgraded   int       // records sealed anew from format 1
	unreadable []string  // records that open in neither format, kept as they are
}

// rebuild makes the head describe the records as they are: format-1
// records are sealed anew in format 2 under the same version, the key check
// is written in format 2, and the counter moves past every version in use.
// strict is the upgrade of a store from before the head: every record must
// then be of format 1, else nothing changes and the result is a
// *TamperError, for format-2 records in such a file mean that an old key
// check was put back into an upgraded store.
func (s *Store) rebuild(tx *bolt.Tx, strict bool) (rebuilt, error) {
	type redo struct {
		bucket, key []byte
		version     uint64
		plaintext   []byte
	}
	var (
		r      rebuilt
		todo   []redo
		notOld []string
	)
	defer func() {
		for _, x := range todo {
			clear(x.plaintext)
		}
	}()
	var counter uint64
	if h, why := s.headOf(tx); why == "" {
		counter = h.counter
	}
	for _, name := range recordBuckets {
		c := tx.Bucket(name).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if version, _, err := s.openFormat(format2, name, k, v); err == nil {
				counter = max(counter, version)
				r.readable++
				notOld = append(notOld, recordName(name, k))
				continue
			}
			if version, pt, err := s.openFormat(format1, name, k, v); err == nil {
				counter = max(counter, version)
				r.readable++
				todo = append(todo, redo{name, bytes.Clone(k), version, pt})
				continue
			}
			r.unreadable = append(r.unreadable, recordName(name, k))
		}
	}
	if strict && len(notOld)+len(r.unreadable) > 0 {
		found := s.scan(tx)
		reason := fmt.Sprintf("the key check is in the format of a store from before the integrity check, "+
			"but %d records are not (an old key check put back into an upgraded store?): %s",
			len(notOld)+len(r.unreadable), nameList(append(notOld, r.unreadable...)))
		return r, s.tamper(tx, &found, reason)
	}
	for _, x := range todo {
		if err := tx.Bucket(x.bucket).Put(x.key, s.seal(x.bucket, x.key, x.version, x.plaintext)); err != nil {
			return r, err
		}
	}
	r.upgraded = len(todo)
	h := s.scan(tx)
	h.counter = counter
	r.count = h.count
	return r, s.putMeta(tx, &h)
}

// Verify runs Open's integrity check on the store as it is now, in one
// read transaction: nil, or a *TamperError (errors.Is ErrTampered). It
// reads every record once.
func (s *Store) Verify(ctx context.Context) error {
	var te *TamperError
	err := s.view(ctx, func(tx *bolt.Tx) error {
		te = s.verify(tx)
		return nil
	})
	if err != nil {
		return s.wrap("verify", "", err)
	}
	if te != nil {
		return fmt.Errorf("boltstore: verify %s: %w", s.path, te)
	}
	return nil
}

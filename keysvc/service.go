package keysvc

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/m2mguard/m2mguard/codec"
)

// Options configure a Service. Only Store is required; every other zero
// value is useful: a zero duration or zero costs take the value of
// DefaultOptions.
type Options struct {
	Store Store            // required
	Now   func() time.Time // clock; nil = time.Now
	Rand  io.Reader        // source of passwords, keys and rids; nil = crypto/rand.Reader
	// ChangeDeadline is how long a pending change waits for its commit.
	ChangeDeadline time.Duration
	// PasswordLifetime and KeyLifetime set upexp/downexp and bkexp of newly
	// generated credentials; 0 = never expire (codec.Never).
	PasswordLifetime, KeyLifetime time.Duration
	Cache                         CacheOptions
	// SessionKeys issues session keys; nil = 32 bytes from crypto/rand.
	SessionKeys SessionKeySource
	// AppHash sets the argon2id cost of new application passwords; zero
	// fields take the defaults of AppHashParams.
	AppHash AppHashParams
	// OnWrite, if set, is called after every write of a terminal record
	// (see Write), once the store has taken it and this Service's cache
	// has dropped the entry: the brokers of a fleet drop each other's
	// entries with it (Invalidate). It runs on the writer's goroutine, a
	// login's too: it must be bounded. nil = nobody is told.
	OnWrite func(Write)
}

// Write names a write of a terminal record, for Options.OnWrite.
type Write struct {
	SN string
	Op string // one of the Op constants
}

// The operations of a Write.
const (
	OpRegister    = "register"     // Register, or a row of Import
	OpStatus      = "status"       // SetStatus, Disable
	OpRekey       = "rekey"        // Rekey
	OpDelete      = "delete"       // Delete
	OpChangeStart = "change-start" // StartChange
	OpCommit      = "commit"       // CommitChange (also one that only dropped an expired change)
	OpDelivered   = "delivered"    // MarkDelivered
	OpExpire      = "expire"       // ExpireChange
)

// DefaultOptions returns the value New gives each zero field of Options
// that has a default (PasswordLifetime and KeyLifetime have none: zero
// means never expire).
func DefaultOptions() Options {
	return Options{ChangeDeadline: 24 * time.Hour, Cache: DefaultCacheOptions(), AppHash: DefaultAppHashParams()}
}

// Service is the key service. It is safe for concurrent use.
type Service struct {
	store    Store
	now      func() time.Time
	rand     io.Reader
	deadline time.Duration
	pwdLife  time.Duration
	keyLife  time.Duration
	cache    *cache
	keys     SessionKeySource
	appHash  AppHashParams
	dummy    dummyHash
	onWrite  func(Write)
}

// New returns a Service on opts.Store.
func New(opts Options) (*Service, error) {
	if opts.Store == nil {
		return nil, fmt.Errorf("keysvc: new: no store: %w", ErrInvalid)
	}
	s := &Service{
		store: opts.Store, now: opts.Now, rand: opts.Rand,
		deadline: opts.ChangeDeadline, pwdLife: opts.PasswordLifetime, keyLife: opts.KeyLifetime,
		keys: opts.SessionKeys, appHash: opts.AppHash.withDefaults(), onWrite: opts.OnWrite,
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.rand == nil {
		s.rand = rand.Reader
	}
	if s.deadline <= 0 {
		s.deadline = DefaultOptions().ChangeDeadline
	}
	if s.keys == nil {
		s.keys = randomKeys{}
	}
	s.cache = newCache(opts.Cache, s.now, s.store.GetTerminal)
	return s, nil
}

// Store returns the store the Service works on.
func (s *Service) Store() Store { return s.store }

// CacheStats returns the read cache counters.
func (s *Service) CacheStats() CacheStats { return s.cache.stats() }

// Invalidate drops the cached record of sn, and voids a fill of it in
// flight: another writer (another broker of a fleet) changed it. The next
// Lookup reads the store.
func (s *Service) Invalidate(sn string) { s.cache.drop(sn) }

// InvalidateAll drops every cached record: this broker may have missed
// other writers' invalidations (it was cut off from its fleet).
func (s *Service) InvalidateAll() { s.cache.dropAll() }

// written drops sn's cache entry and tells Options.OnWrite.
func (s *Service) written(sn, op string) {
	s.cache.drop(sn)
	if s.onWrite != nil {
		s.onWrite(Write{SN: sn, Op: op})
	}
}

// now1 is the clock at second precision, UTC: what records hold.
func (s *Service) now1() time.Time { return s.now().UTC().Truncate(time.Second) }

// expiry returns the uint32 expiry lifetime from now (codec.Never for 0).
func expiry(now time.Time, lifetime time.Duration) uint32 {
	if lifetime <= 0 {
		return codec.Never
	}
	u := now.Add(lifetime).Unix()
	if u >= codec.Never || u < 0 {
		return codec.Never - 1
	}
	return uint32(u)
}

const pwdAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// PasswordLen is the length of generated access passwords (SPEC section 1).
const PasswordLen = 16

// newPassword returns PasswordLen characters of [A-Za-z0-9], uniform:
// rejection sampling of random bytes, no modulo bias.
func (s *Service) newPassword() ([]byte, error) {
	out := make([]byte, 0, PasswordLen)
	var buf [32]byte
	const limit = 256 - 256%len(pwdAlphabet) // 248: accept bytes below it
	for len(out) < PasswordLen {
		if _, err := io.ReadFull(s.rand, buf[:]); err != nil {
			return nil, fmt.Errorf("keysvc: random: %w", err)
		}
		for _, b := range buf {
			if int(b) < limit && len(out) < PasswordLen {
				out = append(out, pwdAlphabet[int(b)%len(pwdAlphabet)])
			}
		}
	}
	clear(buf[:])
	return out, nil
}

func (s *Service) newKey() ([]byte, error) {
	k := make([]byte, codec.BasicKeySize)
	if _, err := io.ReadFull(s.rand, k); err != nil {
		return nil, fmt.Errorf("keysvc: random: %w", err)
	}
	return k, nil
}

func (s *Service) newID() (codec.ID, error) {
	var b [8]byte
	for {
		if _, err := io.ReadFull(s.rand, b[:]); err != nil {
			return 0, fmt.Errorf("keysvc: random: %w", err)
		}
		if id := codec.ID(binary.BigEndian.Uint64(b[:])); id != 0 {
			return id, nil
		}
	}
}

// newCreds fills the credentials what names with fresh values.
func (s *Service) newCreds(c *Credentials, what codec.What, now time.Time) error {
	if what.Passwords() {
		up, err := s.newPassword()
		if err != nil {
			return err
		}
		down, err := s.newPassword()
		if err != nil {
			return err
		}
		exp := expiry(now, s.pwdLife)
		c.Up, c.UpExp, c.Down, c.DownExp = up, exp, down, exp
	}
	if what.BasicKey() {
		bk, err := s.newKey()
		if err != nil {
			return err
		}
		c.BK, c.BKExp = bk, expiry(now, s.keyLife)
	}
	return nil
}

// RegisterRequest names a new terminal.
type RegisterRequest struct {
	SN, IMEI, IMSI    string
	MSISDN            string    // optional: digits, for SMS changes
	Alg               codec.Alg // 0 = codec.HS256
	RequireEncryption bool      // data of this terminal must be sealed (SPEC section 6)
}

func validMSISDN(s string) bool {
	if s == "" {
		return true
	}
	if s[0] == '+' {
		s = s[1:]
	}
	if len(s) < 3 || len(s) > 15 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// newTerminal validates r and builds a record; creds with nil fields get fresh values.
func (s *Service) newTerminal(r RegisterRequest, creds Credentials, now time.Time) (*Terminal, error) {
	if err := (codec.Identity{SN: r.SN, IMEI: r.IMEI, IMSI: r.IMSI}).Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if !validMSISDN(r.MSISDN) {
		return nil, fmt.Errorf("%w: msisdn: want 3 to 15 digits, optionally after '+'", ErrInvalid)
	}
	if r.Alg == 0 {
		r.Alg = codec.HS256
	}
	if r.Alg != codec.MD5 && r.Alg != codec.HS256 {
		return nil, fmt.Errorf("%w: alg: want md5 or hs256", ErrInvalid)
	}
	var gen Credentials
	if creds.Up == nil || creds.Down == nil || creds.BK == nil {
		if err := s.newCreds(&gen, codec.WhatAll, now); err != nil {
			return nil, err
		}
	}
	if creds.Up == nil {
		creds.Up, creds.UpExp = gen.Up, gen.UpExp
	}
	if creds.Down == nil {
		creds.Down, creds.DownExp = gen.Down, gen.DownExp
	}
	if creds.BK == nil {
		creds.BK, creds.BKExp = gen.BK, gen.BKExp
	}
	return &Terminal{
		SN: r.SN, IMEI: r.IMEI, IMSI: r.IMSI, MSISDN: r.MSISDN, Alg: r.Alg,
		Status: StatusActive, RequireEncryption: r.RequireEncryption,
		Creds: creds, Created: now, Updated: now,
	}, nil
}

// Register creates a terminal with fresh credentials: 16-character
// [A-Za-z0-9] up and down passwords and a 32-byte basic key, from the
// Service's random source. ErrExists if sn is taken, ErrInvalid for a bad
// identity, MSISDN or alg.
func (s *Service) Register(ctx context.Context, r RegisterRequest) (*Terminal, error) {
	t, err := s.newTerminal(r, Credentials{}, s.now1())
	if err != nil {
		return nil, fmt.Errorf("keysvc: register: %w", err)
	}
	if err := s.store.CreateTerminal(ctx, t); err != nil {
		return nil, fmt.Errorf("keysvc: register %s: %w", t.SN, err)
	}
	s.written(t.SN, OpRegister) // a negative entry may be cached
	return t, nil
}

// Get reads the record of sn from the store (never the cache).
func (s *Service) Get(ctx context.Context, sn string) (*Terminal, error) {
	t, err := s.store.GetTerminal(ctx, sn)
	if err != nil {
		return nil, fmt.Errorf("keysvc: get %s: %w", safeSN(sn), err)
	}
	return t, nil
}

// Lookup returns the record of sn through the read cache: the CONNECT hot
// path. A fresh entry is served without a store call; past the TTL it is
// refetched (one store call however many logins wait); while the store is
// unavailable a known terminal is served from its entry for up to MaxStale
// and an unknown one is refused (fail closed, ErrUnavailable). A pending
// change past its deadline is left out of the returned record. The record
// is shared: do not modify it.
func (s *Service) Lookup(ctx context.Context, sn string) (*Terminal, error) {
	t, err := s.cache.get(ctx, sn)
	if err != nil {
		return nil, &lookupError{sn: sn, err: err}
	}
	if t.Pending != nil && !s.now().Before(t.Pending.Deadline) {
		t = t.Clone()
		t.Pending = nil
	}
	return t, nil
}

// lookupError is Lookup's error, "keysvc: lookup <sn>: <err>". Its text is
// made when asked for: a login of an unknown serial number (served from the
// negative cache) is refused without reading it, and fmt.Errorf cost it
// three allocations where this costs one.
type lookupError struct {
	sn  string
	err error
}

func (e *lookupError) Error() string { return "keysvc: lookup " + safeSN(e.sn) + ": " + e.err.Error() }
func (e *lookupError) Unwrap() error { return e.err }

// safeSN keeps a malformed (attacker-chosen) sn out of error texts.
func safeSN(sn string) string {
	if codec.ValidateSN(sn) != nil {
		return "(invalid sn)"
	}
	return sn
}

// List returns up to limit terminals with serial numbers after after,
// sorted, and the sn to pass as after for the next page ("" at the end).
// limit <= 0 means 100; at most 1000 are returned.
func (s *Service) List(ctx context.Context, after string, limit int) ([]*Terminal, string, error) {
	if limit <= 0 {
		limit = 100
	}
	limit = min(limit, 1000)
	sns, err := s.store.ListTerminals(ctx, after, limit)
	if err != nil {
		return nil, "", fmt.Errorf("keysvc: list: %w", err)
	}
	ts, err := s.getMany(ctx, sns)
	if err != nil {
		return nil, "", fmt.Errorf("keysvc: list: %w", err)
	}
	out := make([]*Terminal, 0, len(sns))
	for _, t := range ts {
		if t != nil { // else deleted since the listing
			out = append(out, t)
		}
	}
	next := ""
	if len(sns) == limit {
		next = sns[len(sns)-1]
	}
	return out, next, nil
}

// getMany reads the records of sns, in order (nil for one that is gone):
// at once if the store is a BulkReader, else one after another.
func (s *Service) getMany(ctx context.Context, sns []string) ([]*Terminal, error) {
	if bulk, ok := s.store.(BulkReader); ok {
		return bulk.GetTerminals(ctx, sns)
	}
	out := make([]*Terminal, len(sns))
	for i, sn := range sns {
		t, err := s.store.GetTerminal(ctx, sn)
		if err != nil && !errors.Is(err, ErrNotFound) {
			return nil, err
		}
		out[i] = t
	}
	return out, nil
}

// SetStatus enables (StatusActive) or disables (StatusDisabled) a terminal.
// Disabling also cancels its pending change, in the same atomic write (see
// Disable, which says which change it cancelled).
func (s *Service) SetStatus(ctx context.Context, sn string, st Status) (*Terminal, error) {
	if st == StatusDisabled {
		t, _, err := s.Disable(ctx, sn)
		return t, err
	}
	if st != StatusActive {
		return nil, fmt.Errorf("keysvc: set status %s: %w: want active or disabled", safeSN(sn), ErrInvalid)
	}
	t, err := s.update(ctx, sn, OpStatus, func(t *Terminal) error {
		if t.Status == st {
			return errSkip
		}
		t.Status = st
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("keysvc: set status %s: %w", safeSN(sn), err)
	}
	return t, nil
}

// Disable disables a terminal and cancels its pending change in the same
// check-and-set write, so that no change started before can be delivered,
// acknowledged or committed afterwards (SECURITY.md: disable, then rotate
// out of band with Rekey). It returns the record and the change it
// cancelled (nil if none). Disabling a disabled terminal changes nothing.
func (s *Service) Disable(ctx context.Context, sn string) (*Terminal, *Change, error) {
	var cancelled *Change
	t, err := s.update(ctx, sn, OpStatus, func(t *Terminal) error {
		cancelled = t.Pending
		if t.Status == StatusDisabled && t.Pending == nil {
			return errSkip
		}
		t.Status, t.Pending = StatusDisabled, nil
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("keysvc: disable %s: %w", safeSN(sn), err)
	}
	return t, cancelled.Clone(), nil
}

// Rekey replaces every credential of a terminal (both access passwords and
// the basic key) with fresh values, out of band: nothing is sent to the
// terminal, and a pending change is cancelled. It is how an operator
// rotates the secrets of a terminal that may be compromised: disable it
// (which ends its sessions), Rekey, write the returned values into the
// genuine device, enable. The status is left as it is. The returned record
// carries the new secrets: show them once.
func (s *Service) Rekey(ctx context.Context, sn string) (*Terminal, error) {
	t, err := s.update(ctx, sn, OpRekey, func(t *Terminal) error {
		t.Pending = nil
		return s.newCreds(&t.Creds, codec.WhatAll, s.now1())
	})
	if err != nil {
		return nil, fmt.Errorf("keysvc: rekey %s: %w", safeSN(sn), err)
	}
	return t, nil
}

// Delete removes a terminal.
func (s *Service) Delete(ctx context.Context, sn string) error {
	err := s.store.DeleteTerminal(ctx, sn)
	s.cache.drop(sn)
	if err != nil {
		return fmt.Errorf("keysvc: delete %s: %w", safeSN(sn), err)
	}
	s.written(sn, OpDelete)
	return nil
}

// NewSessionKey issues a session key for a login of sn (SPEC section 5).
func (s *Service) NewSessionKey(ctx context.Context, sn string) ([]byte, error) {
	k, err := s.keys.NewSessionKey(ctx, sn)
	if err != nil {
		return nil, fmt.Errorf("keysvc: session key %s: %w", safeSN(sn), err)
	}
	if len(k) != codec.SessionKeySize {
		return nil, fmt.Errorf("keysvc: session key %s: source gave %d bytes, want %d", safeSN(sn), len(k), codec.SessionKeySize)
	}
	return k, nil
}

type randomKeys struct{}

func (randomKeys) NewSessionKey(context.Context, string) ([]byte, error) {
	k := make([]byte, codec.SessionKeySize)
	if _, err := rand.Read(k); err != nil {
		return nil, err
	}
	return k, nil
}

// errSkip, returned by an update function, means "nothing to write": update
// returns the record as loaded, without error.
var errSkip = errors.New("keysvc: no change")

// writeThen, returned by an update function, means "write the mutation,
// then return err".
type writeThen struct{ err error }

func (w writeThen) Error() string { return w.err.Error() }
func (w writeThen) Unwrap() error { return w.err }

// maxAttempts bounds the retries of update on ErrConflict.
const maxAttempts = 8

// update is the one read-modify-write path: load sn from the store, clone,
// apply fn, write back with check-and-set, retry fn on a lost race, and
// drop the cache entry; a write is reported as op (Options.OnWrite). fn may run several times and must not have side
// effects outside the record.
func (s *Service) update(ctx context.Context, sn, op string, fn func(*Terminal) error) (*Terminal, error) {
	defer s.cache.drop(sn)
	for range maxAttempts {
		cur, err := s.store.GetTerminal(ctx, sn)
		if err != nil {
			return nil, err
		}
		t := cur.Clone()
		ferr := fn(t)
		var then writeThen
		switch {
		case ferr == nil:
		case errors.Is(ferr, errSkip):
			return cur, nil
		case errors.As(ferr, &then):
		default:
			return nil, ferr
		}
		t.Updated = s.now1()
		err = s.store.UpdateTerminal(ctx, t)
		if errors.Is(err, ErrConflict) {
			continue
		}
		if err != nil {
			return nil, err
		}
		s.written(sn, op)
		if then.err != nil {
			return t, then.err
		}
		return t, nil
	}
	return nil, fmt.Errorf("%w: gave up after %d attempts", ErrConflict, maxAttempts)
}

package boltstore

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// MasterKeySize is the size of the master key: AES-256.
const MasterKeySize = 32

var (
	bucketTerminals = []byte("terminals")
	bucketApps      = []byte("apps")
	bucketMeta      = []byte("meta")
	keyCheck        = []byte("keycheck")
	keyHead         = []byte("head")
	checkPlaintext  = []byte("m2mguard boltstore master key check v1")
)

// The value formats, told apart by their authenticated data. Format 1, of
// stores written before the integrity head, had no prefix; its values are
// read only to upgrade such a store (check.go). Format 2 is written since.
const (
	format1 = 1
	format2 = 2
)

// aadPrefix starts the authenticated data of format 2. Format 1 starts
// with a bucket name, so the two never collide.
var aadPrefix = []byte("m2mguard boltstore v2\x00")

// Options configure Open.
type Options struct {
	// MasterKey encrypts every record (AES-256-GCM); MasterKeySize bytes.
	// See LoadOrCreateMasterKey. Required.
	MasterKey []byte
	// Timeout bounds the wait for the file lock held by another process;
	// 0 = 5 s.
	Timeout time.Duration
	// NoSync skips fsync after each commit (tests and benchmarks only: a
	// crash may lose the last transactions).
	NoSync bool
	// Reseal is the way out of a failed integrity check, for an operator
	// who has checked the records and accepts them as they are: the reseal
	// code that the *TamperError of the failed Open carries. Open then
	// rewrites the integrity head over the records as they are, and logs so
	// at level Error. The code fits exactly that state of the file, so a
	// setting left in place accepts no later change. "" = never.
	Reseal string
	// Logger receives the upgrade of a store from before the integrity head
	// and any reseal; nil = slog.Default().
	Logger *slog.Logger
}

// Store is a keysvc.Store in one bbolt file. Every record value is sealed
// with AES-256-GCM under the master key; the authenticated data binds it to
// its bucket, key and version, so a value cannot be forged or moved to
// another key. The version for check-and-set lives in clear in front of the
// sealed value:
//
//	value = be64(version) || nonce12 || GCM(plaintext, aad = "m2mguard boltstore v2" 0x00 bucket 0x00 key be64(version))
//
// A value alone does not show that it is the latest one: an older sealed
// copy of the same record authenticates too. That is what the integrity
// head is for (integrity.go): Open (and Verify) find a record rolled back,
// deleted, put back after a delete or copied over another, alone or with
// others, and refuse the file with ErrTampered. They cannot find the whole
// file replaced by an earlier copy of itself.
//
// A Store is safe for concurrent use.
type Store struct {
	db     *bolt.DB
	aead   cipher.AEAD
	kInt   []byte // integrity key, HKDF of the master key
	path   string
	log    *slog.Logger
	macers sync.Pool // of *macer, for writes
	closed atomic.Bool
}

var (
	_ keysvc.Store       = (*Store)(nil)
	_ keysvc.BulkCreator = (*Store)(nil)
)

// ErrWrongKey is returned by Open when the master key is not the one the
// file was created with.
var ErrWrongKey = errors.New("boltstore: master key does not open this store (wrong key or wrong file)")

// Open opens or creates the store file at path and checks its integrity in
// one pass over the records: a file that is not as this store left it gives
// a *TamperError (errors.Is ErrTampered) that says what to do. A store
// written before the integrity head existed is upgraded at its first Open
// (logged at level Warn).
func Open(path string, opts Options) (*Store, error) {
	if len(opts.MasterKey) != MasterKeySize {
		return nil, fmt.Errorf("boltstore: master key must be %d bytes: %w", MasterKeySize, keysvc.ErrInvalid)
	}
	block, err := aes.NewCipher(opts.MasterKey)
	if err != nil {
		return nil, fmt.Errorf("boltstore: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("boltstore: %w", err)
	}
	kInt, err := hkdf.Key(sha256.New, opts.MasterKey, nil, integrityInfo, sha256.Size)
	if err != nil {
		return nil, fmt.Errorf("boltstore: %w", err)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Timeout == 0 {
		opts.Timeout = 5 * time.Second
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: opts.Timeout, NoSync: opts.NoSync})
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("boltstore: open %s: locked by another process: %w", path, keysvc.ErrUnavailable)
		}
		return nil, fmt.Errorf("boltstore: open %s: %w", path, err)
	}
	s := &Store{db: db, aead: aead, kInt: kInt, path: path, log: opts.Logger}
	s.macers.New = func() any { return newMacer(kInt) }
	if err := db.Update(func(tx *bolt.Tx) error { return s.init(tx, opts.Reseal) }); err != nil {
		db.Close()
		return nil, fmt.Errorf("boltstore: open %s: %w", path, err)
	}
	return s, nil
}

// Close closes the file. Later operations fail with keysvc.ErrUnavailable.
func (s *Store) Close() error {
	s.closed.Store(true)
	return s.db.Close()
}

// Path returns the file the store lives in.
func (s *Store) Path() string { return s.path }

func aad(format int, bucket, key []byte, version uint64) []byte {
	a := make([]byte, 0, len(aadPrefix)+len(bucket)+1+len(key)+8)
	if format == format2 {
		a = append(a, aadPrefix...)
	}
	a = append(a, bucket...)
	a = append(a, 0)
	a = append(a, key...)
	return binary.BigEndian.AppendUint64(a, version)
}

func (s *Store) seal(bucket, key []byte, version uint64, plaintext []byte) []byte {
	out := make([]byte, 8+12, 8+12+len(plaintext)+s.aead.Overhead())
	binary.BigEndian.PutUint64(out, version)
	if _, err := rand.Read(out[8:20]); err != nil {
		panic("boltstore: crypto/rand failed: " + err.Error())
	}
	return s.aead.Seal(out, out[8:20], plaintext, aad(format2, bucket, key, version))
}

// open authenticates and decrypts a stored value. The plaintext is a fresh
// buffer (bolt's memory is valid only inside the transaction).
func (s *Store) open(bucket, key, v []byte) (uint64, []byte, error) {
	return s.openFormat(format2, bucket, key, v)
}

func (s *Store) openFormat(format int, bucket, key, v []byte) (uint64, []byte, error) {
	if len(v) < 8+12+s.aead.Overhead() {
		return 0, nil, fmt.Errorf("%w: value too short", keysvc.ErrInvalid)
	}
	version := binary.BigEndian.Uint64(v)
	pt, err := s.aead.Open(nil, v[8:20], v[20:], aad(format, bucket, key, version))
	if err != nil {
		return 0, nil, fmt.Errorf("%w: value does not authenticate under the master key", keysvc.ErrInvalid)
	}
	return version, pt, nil
}

func storedVersion(v []byte) uint64 {
	if len(v) < 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

// wrap turns bolt errors into keysvc sentinels, with context.
func (s *Store) wrap(op, name string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, bolterrors.ErrDatabaseNotOpen) || errors.Is(err, bolterrors.ErrDatabaseReadOnly) || s.closed.Load() {
		if !errors.Is(err, keysvc.ErrUnavailable) {
			err = fmt.Errorf("%w: %w", keysvc.ErrUnavailable, err)
		}
	}
	if name == "" {
		return fmt.Errorf("boltstore: %s: %w", op, err)
	}
	return fmt.Errorf("boltstore: %s %s: %w", op, name, err)
}

func (s *Store) view(ctx context.Context, fn func(tx *bolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if s.closed.Load() {
		return keysvc.ErrUnavailable
	}
	return s.db.View(fn)
}

// update runs fn in a write transaction, through a batch that keeps the
// integrity head in step with the records: the head is read (a write fails
// if it is missing or does not authenticate) and, if fn changed anything,
// written back in the same commit.
func (s *Store) update(ctx context.Context, fn func(w *batch) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if s.closed.Load() {
		return keysvc.ErrUnavailable
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		h, why := s.headOf(tx)
		if why != "" {
			return fmt.Errorf("%w: %s", ErrTampered, why)
		}
		w := &batch{s: s, tx: tx, head: h}
		err := fn(w)
		if w.mac != nil {
			s.macers.Put(w.mac)
		}
		if err != nil {
			return err
		}
		if w.head == h {
			return nil
		}
		return s.putHead(tx, &w.head)
	})
}

// batch is one write transaction. Every record write and delete goes
// through it, so that the head changes with the records.
type batch struct {
	s    *Store
	tx   *bolt.Tx
	head head
	mac  *macer
}

func (w *batch) element(bucket, key, v []byte) [sha256.Size]byte {
	if w.mac == nil {
		w.mac = w.s.macers.Get().(*macer)
	}
	return w.mac.element(bucket, key, v)
}

// put seals plaintext as bucket/key under the next version and returns it.
func (w *batch) put(bucket, key, plaintext []byte) (uint64, error) {
	if w.head.counter == math.MaxUint64 {
		return 0, errors.New("version counter exhausted")
	}
	b := w.tx.Bucket(bucket)
	if old := b.Get(key); old != nil {
		w.head.xor(w.element(bucket, key, old))
	} else {
		*w.head.countOf(bucket)++
	}
	w.head.counter++
	v := w.s.seal(bucket, key, w.head.counter, plaintext)
	if err := b.Put(key, v); err != nil {
		return 0, err
	}
	w.head.xor(w.element(bucket, key, v))
	return w.head.counter, nil
}

// get returns the stored value of bucket/key, or nil.
func (w *batch) get(bucket, key []byte) []byte { return w.tx.Bucket(bucket).Get(key) }

// delete removes bucket/key, or fails with keysvc.ErrNotFound.
func (w *batch) delete(bucket, key []byte) error {
	b := w.tx.Bucket(bucket)
	old := b.Get(key)
	if old == nil {
		return keysvc.ErrNotFound
	}
	w.head.xor(w.element(bucket, key, old))
	*w.head.countOf(bucket)--
	return b.Delete(key)
}

// putHead seals h (under its counter as version) into the meta bucket.
func (s *Store) putHead(tx *bolt.Tx, h *head) error {
	return tx.Bucket(bucketMeta).Put(keyHead, s.seal(bucketMeta, keyHead, h.counter, h.encode()))
}

func checkSN(sn string) error {
	if err := codec.ValidateSN(sn); err != nil {
		return fmt.Errorf("%w: %w", keysvc.ErrInvalid, err)
	}
	return nil
}

func checkTerminal(t *keysvc.Terminal) error {
	if t == nil {
		return fmt.Errorf("%w: nil terminal", keysvc.ErrInvalid)
	}
	return checkSN(t.SN)
}

func (s *Store) getTerminal(tx *bolt.Tx, key []byte) (*keysvc.Terminal, error) {
	v := tx.Bucket(bucketTerminals).Get(key)
	if v == nil {
		return nil, keysvc.ErrNotFound
	}
	version, pt, err := s.open(bucketTerminals, key, v)
	if err != nil {
		return nil, err
	}
	t, err := decodeTerminal(pt)
	clear(pt)
	if err != nil {
		return nil, err
	}
	if t.SN != string(key) {
		return nil, fmt.Errorf("%w: record names another terminal", keysvc.ErrInvalid)
	}
	t.Version = version
	return t, nil
}

// GetTerminal implements keysvc.Store.
func (s *Store) GetTerminal(ctx context.Context, sn string) (*keysvc.Terminal, error) {
	if err := checkSN(sn); err != nil {
		return nil, s.wrap("get terminal", "", err)
	}
	var t *keysvc.Terminal
	err := s.view(ctx, func(tx *bolt.Tx) error {
		var err error
		t, err = s.getTerminal(tx, []byte(sn))
		return err
	})
	if err != nil {
		return nil, s.wrap("get terminal", sn, err)
	}
	return t, nil
}

func putTerminal(w *batch, t *keysvc.Terminal) (uint64, error) {
	pt := encodeTerminal(make([]byte, 0, 512), t)
	defer clear(pt)
	return w.put(bucketTerminals, []byte(t.SN), pt)
}

// CreateTerminal implements keysvc.Store.
func (s *Store) CreateTerminal(ctx context.Context, t *keysvc.Terminal) error {
	if err := checkTerminal(t); err != nil {
		return s.wrap("create terminal", "", err)
	}
	var version uint64
	err := s.update(ctx, func(w *batch) error {
		if w.get(bucketTerminals, []byte(t.SN)) != nil {
			return keysvc.ErrExists
		}
		var err error
		version, err = putTerminal(w, t)
		return err
	})
	if err != nil {
		return s.wrap("create terminal", t.SN, err)
	}
	t.Version = version
	return nil
}

// CreateTerminals implements keysvc.BulkCreator: all records in one
// transaction (one fsync). Records that exist already, or are invalid, are
// skipped and reported; the others are stored and get their Version set.
func (s *Store) CreateTerminals(ctx context.Context, ts []*keysvc.Terminal) ([]error, error) {
	errs := make([]error, len(ts))
	versions := make([]uint64, len(ts))
	err := s.update(ctx, func(w *batch) error {
		clear(errs)
		for i, t := range ts {
			if err := checkTerminal(t); err != nil {
				errs[i] = err
				continue
			}
			if w.get(bucketTerminals, []byte(t.SN)) != nil {
				errs[i] = keysvc.ErrExists
				continue
			}
			v, err := putTerminal(w, t)
			if err != nil {
				return err
			}
			versions[i] = v
		}
		return nil
	})
	if err != nil {
		return nil, s.wrap("create terminals", "", err)
	}
	for i, t := range ts {
		if errs[i] == nil {
			t.Version = versions[i]
		} else if t != nil {
			errs[i] = fmt.Errorf("boltstore: create terminal %s: %w", t.SN, errs[i])
		}
	}
	return errs, nil
}

// UpdateTerminal implements keysvc.Store: check-and-set on t.Version, in one
// bolt transaction.
func (s *Store) UpdateTerminal(ctx context.Context, t *keysvc.Terminal) error {
	if err := checkTerminal(t); err != nil {
		return s.wrap("update terminal", "", err)
	}
	var version uint64
	err := s.update(ctx, func(w *batch) error {
		cur := w.get(bucketTerminals, []byte(t.SN))
		if cur == nil {
			return keysvc.ErrNotFound
		}
		if storedVersion(cur) != t.Version {
			return keysvc.ErrConflict
		}
		var err error
		version, err = putTerminal(w, t)
		return err
	})
	if err != nil {
		return s.wrap("update terminal", t.SN, err)
	}
	t.Version = version
	return nil
}

// DeleteTerminal implements keysvc.Store.
func (s *Store) DeleteTerminal(ctx context.Context, sn string) error {
	if err := checkSN(sn); err != nil {
		return s.wrap("delete terminal", "", err)
	}
	err := s.update(ctx, func(w *batch) error { return w.delete(bucketTerminals, []byte(sn)) })
	return s.wrap("delete terminal", sn, err)
}

// ListTerminals implements keysvc.Store.
func (s *Store) ListTerminals(ctx context.Context, after string, limit int) ([]string, error) {
	var out []string
	err := s.view(ctx, func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketTerminals).Cursor()
		k, _ := c.Seek([]byte(after))
		if k != nil && bytes.Equal(k, []byte(after)) {
			k, _ = c.Next()
		}
		for ; k != nil && (limit <= 0 || len(out) < limit); k, _ = c.Next() {
			out = append(out, string(k))
		}
		return nil
	})
	if err != nil {
		return nil, s.wrap("list terminals", "", err)
	}
	return out, nil
}

// appRecord is the plaintext of an application (JSON: not on a hot path).
type appRecord struct {
	Name         string    `json:"name"`
	PasswordHash string    `json:"password_hash"`
	Subscribe    []string  `json:"subscribe"`
	Publish      []string  `json:"publish"`
	Created      time.Time `json:"created"`
}

func checkAppName(name string) error {
	if name == "" || len(name) > 128 {
		return fmt.Errorf("%w: app name must be 1-128 bytes", keysvc.ErrInvalid)
	}
	return nil
}

// GetApp implements keysvc.Store.
func (s *Store) GetApp(ctx context.Context, name string) (*keysvc.App, error) {
	if err := checkAppName(name); err != nil {
		return nil, s.wrap("get app", "", err)
	}
	var a *keysvc.App
	err := s.view(ctx, func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketApps).Get([]byte(name))
		if v == nil {
			return keysvc.ErrNotFound
		}
		_, pt, err := s.open(bucketApps, []byte(name), v)
		if err != nil {
			return err
		}
		var r appRecord
		if err := json.Unmarshal(pt, &r); err != nil || r.Name != name {
			return fmt.Errorf("%w: corrupt app record", keysvc.ErrInvalid)
		}
		a = &keysvc.App{Name: r.Name, PasswordHash: r.PasswordHash, Subscribe: r.Subscribe, Publish: r.Publish, Created: r.Created}
		return nil
	})
	if err != nil {
		return nil, s.wrap("get app", name, err)
	}
	return a, nil
}

// PutApp implements keysvc.Store.
func (s *Store) PutApp(ctx context.Context, a *keysvc.App) error {
	if a == nil {
		return s.wrap("put app", "", fmt.Errorf("%w: nil app", keysvc.ErrInvalid))
	}
	if err := checkAppName(a.Name); err != nil {
		return s.wrap("put app", "", err)
	}
	pt, err := json.Marshal(appRecord{Name: a.Name, PasswordHash: a.PasswordHash, Subscribe: a.Subscribe, Publish: a.Publish, Created: a.Created})
	if err != nil {
		return s.wrap("put app", a.Name, err)
	}
	err = s.update(ctx, func(w *batch) error {
		_, err := w.put(bucketApps, []byte(a.Name), pt)
		return err
	})
	return s.wrap("put app", a.Name, err)
}

// DeleteApp implements keysvc.Store.
func (s *Store) DeleteApp(ctx context.Context, name string) error {
	if err := checkAppName(name); err != nil {
		return s.wrap("delete app", "", err)
	}
	err := s.update(ctx, func(w *batch) error { return w.delete(bucketApps, []byte(name)) })
	return s.wrap("delete app", name, err)
}

// ListApps implements keysvc.Store.
func (s *Store) ListApps(ctx context.Context) ([]string, error) {
	var out []string
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(bucketApps).ForEach(func(k, _ []byte) error {
			out = append(out, string(k))
			return nil
		})
	})
	if err != nil {
		return nil, s.wrap("list apps", "", err)
	}
	return out, nil
}

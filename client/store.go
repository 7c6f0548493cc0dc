package client

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/m2mguard/m2mguard/codec"
)

// Credentials are the secrets a terminal logs in with (SPEC section 1): the
// uplink and downlink access passwords and the basic key, each with its
// expiry in unix seconds (codec.Never for none). The secrets are bytes so
// that they can be cleared; no method of this package prints them.
type Credentials struct {
	Up      []byte `json:"up"`
	UpExp   uint32 `json:"upexp"`
	Down    []byte `json:"down"`
	DownExp uint32 `json:"downexp"`
	BK      []byte `json:"bk,omitempty"` // 32 bytes, or empty if the terminal holds no basic key
	BKExp   uint32 `json:"bkexp"`
}

// Clone returns a deep copy.
func (c Credentials) Clone() Credentials {
	c.Up, c.Down, c.BK = bytes.Clone(c.Up), bytes.Clone(c.Down), bytes.Clone(c.BK)
	return c
}

// Apply returns the credentials that result from the change p: the values p
// replaces (as p.What says) taken from p, the others kept.
func (c Credentials) Apply(p codec.Params) Credentials {
	n := c.Clone()
	if p.What.Passwords() {
		n.Up, n.UpExp = bytes.Clone(p.Up), p.UpExp
		n.Down, n.DownExp = bytes.Clone(p.Down), p.DownExp
	}
	if p.What.BasicKey() {
		n.BK, n.BKExp = bytes.Clone(p.BK), p.BKExp
	}
	return n
}

// Validate reports the first credential that is malformed.
func (c Credentials) Validate() error {
	if err := codec.ValidatePassword("up", c.Up); err != nil {
		return err
	}
	if err := codec.ValidatePassword("down", c.Down); err != nil {
		return err
	}
	if len(c.BK) != 0 && len(c.BK) != codec.BasicKeySize {
		return fmt.Errorf("client: bk: want %d bytes or none", codec.BasicKeySize)
	}
	return nil
}

// Clear overwrites the secrets with zeros.
func (c *Credentials) Clear() {
	clear(c.Up)
	clear(c.Down)
	clear(c.BK)
}

// Pending is a change the terminal has received (in a cfg message or by
// SMS) and acknowledged or is about to acknowledge, but whose commit it has
// not seen yet. Until then both the current and the new values are kept.
type Pending struct {
	RID      codec.ID
	Params   codec.Params // the new values; Params.What says which
	Mode     codec.Mode   // how the values arrived: cipher or sms
	Received time.Time
}

// Record is everything a CredentialStore holds for one terminal.
type Record struct {
	// Identity and Alg are optional metadata for tools such as m2m-terminal
	// (they are not secret); the client uses its Config's values.
	Identity codec.Identity
	Alg      codec.Alg
	// BrokerURL is the broker of the provisioning bundle (tcp://host:1883,
	// ssl://, ws://, wss://...), also optional metadata: m2m-terminal uses
	// it when no --broker is given. Empty in files written before it.
	BrokerURL string
	Current   Credentials // the values the platform has committed
	Pending   *Pending    // a change not yet known to be committed, or nil
}

// Clone returns a deep copy.
func (r *Record) Clone() *Record {
	if r == nil {
		return nil
	}
	n := *r
	n.Current = r.Current.Clone()
	if r.Pending != nil {
		p := *r.Pending
		p.Params = cloneParams(p.Params)
		n.Pending = &p
	}
	return &n
}

// New returns the credentials the pending change leads to (the current ones
// if nothing is pending).
func (r *Record) New() Credentials {
	if r.Pending == nil {
		return r.Current.Clone()
	}
	return r.Current.Apply(r.Pending.Params)
}

func cloneParams(p codec.Params) codec.Params {
	p.Up, p.Down, p.BK = bytes.Clone(p.Up), bytes.Clone(p.Down), bytes.Clone(p.BK)
	return p
}

// CredentialStore keeps a terminal's credentials across restarts. Every
// method must be durable when it returns: a power cut right after it leaves
// the stored state as the call made it, and a power cut during it leaves the
// state as it was before. The client calls SavePending before it sends the
// ack of a change, Commit once it knows the platform committed (done, or a
// login or message that only the new values verify), and Discard when the
// platform no longer knows the change.
type CredentialStore interface {
	// Load returns the stored record (a copy the caller may keep).
	Load() (*Record, error)
	// SavePending stores p as the pending change, replacing any other one.
	// The current values stay.
	SavePending(p Pending) error
	// Commit makes the pending change rid current and forgets the old
	// values. It is a no-op if rid is not pending (already committed).
	Commit(rid codec.ID) error
	// Discard drops the pending change rid and keeps the current values.
	// It is a no-op if rid is not pending.
	Discard(rid codec.ID) error
}

// ErrNoCredentials is returned by Load when the store holds no credentials.
var ErrNoCredentials = errors.New("client: no credentials stored")

// MemStore is a CredentialStore in memory, for tests and examples.
type MemStore struct {
	mu  sync.Mutex
	rec *Record
}

// NewMemStore returns a MemStore holding a copy of rec.
func NewMemStore(rec *Record) *MemStore { return &MemStore{rec: rec.Clone()} }

// Load implements CredentialStore.
func (m *MemStore) Load() (*Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.rec == nil {
		return nil, ErrNoCredentials
	}
	return m.rec.Clone(), nil
}

// SavePending implements CredentialStore.
func (m *MemStore) SavePending(p Pending) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.rec == nil {
		return ErrNoCredentials
	}
	p.Params = cloneParams(p.Params)
	m.rec.Pending = &p
	return nil
}

// Commit implements CredentialStore.
func (m *MemStore) Commit(rid codec.ID) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.rec == nil || m.rec.Pending == nil || m.rec.Pending.RID != rid {
		return nil
	}
	m.rec.Current = m.rec.New()
	m.rec.Pending = nil
	return nil
}

// Discard implements CredentialStore.
func (m *MemStore) Discard(rid codec.ID) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.rec != nil && m.rec.Pending != nil && m.rec.Pending.RID == rid {
		m.rec.Pending = nil
	}
	return nil
}

// FileStore is a CredentialStore in one JSON file, mode 0600. Every change
// is written to a temporary file in the same directory, synced, renamed
// over the old file and the directory synced, so the file is at every
// moment either the old or the new version, never a mix; the pending change
// is kept next to the current values until Commit or Discard.
type FileStore struct {
	path string
	mu   sync.Mutex

	// hook, if set, is called between the steps of a write (tests simulate
	// a crash by returning an error from it).
	hook func(step string) error
}

// NewFileStore returns a FileStore on path. The file need not exist yet;
// Save creates it.
func NewFileStore(path string) *FileStore { return &FileStore{path: path} }

// Path returns the file's path.
func (f *FileStore) Path() string { return f.path }

// fileFormat is the on-disk layout, version 1. []byte fields are standard
// base64 (encoding/json).
type fileFormat struct {
	Version  int          `json:"version"`
	SN       string       `json:"sn,omitempty"`
	IMEI     string       `json:"imei,omitempty"`
	IMSI     string       `json:"imsi,omitempty"`
	Alg      string       `json:"alg,omitempty"`
	Broker   string       `json:"broker,omitempty"`
	Current  Credentials  `json:"current"`
	Pending  *filePending `json:"pending,omitempty"`
	Modified time.Time    `json:"modified"`
}

type filePending struct {
	RID      string    `json:"rid"`
	What     string    `json:"what"`
	Mode     string    `json:"mode,omitempty"`
	Received time.Time `json:"received"`
	New      struct {
		Up      []byte `json:"up,omitempty"`
		UpExp   uint32 `json:"upexp,omitempty"`
		Down    []byte `json:"down,omitempty"`
		DownExp uint32 `json:"downexp,omitempty"`
		BK      []byte `json:"bk,omitempty"`
		BKExp   uint32 `json:"bkexp,omitempty"`
	} `json:"new"`
}

const fileVersion = 1

// DecodeRecord parses the FileStore format. It checks every value, so a
// damaged file is reported rather than used.
func DecodeRecord(data []byte) (*Record, error) {
	var ff fileFormat
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ff); err != nil {
		return nil, fmt.Errorf("client: credential file: %w", err)
	}
	if dec.More() {
		return nil, errors.New("client: credential file: trailing data")
	}
	if ff.Version != fileVersion {
		return nil, fmt.Errorf("client: credential file: version %d, want %d", ff.Version, fileVersion)
	}
	r := &Record{Identity: codec.Identity{SN: ff.SN, IMEI: ff.IMEI, IMSI: ff.IMSI}, BrokerURL: ff.Broker, Current: ff.Current}
	if ff.Broker != "" {
		if err := ValidateBrokerURL(ff.Broker); err != nil {
			return nil, fmt.Errorf("client: credential file: broker: %w", err)
		}
	}
	if ff.Alg != "" {
		a, err := codec.ParseAlg(ff.Alg)
		if err != nil {
			return nil, fmt.Errorf("client: credential file: %w", err)
		}
		r.Alg = a
	}
	if err := r.Current.Validate(); err != nil {
		return nil, fmt.Errorf("client: credential file: current: %w", err)
	}
	if fp := ff.Pending; fp != nil {
		rid, err := codec.ParseID(fp.RID)
		if err != nil {
			return nil, fmt.Errorf("client: credential file: pending: %w", err)
		}
		p := codec.Params{What: codec.What(fp.What), Up: fp.New.Up, UpExp: fp.New.UpExp, Down: fp.New.Down,
			DownExp: fp.New.DownExp, BK: fp.New.BK, BKExp: fp.New.BKExp}
		switch p.What {
		case codec.WhatPwd, codec.WhatBK, codec.WhatAll:
		default:
			return nil, errors.New("client: credential file: pending: bad what")
		}
		if _, err := p.AppendTo(nil); err != nil { // validates every value What needs
			return nil, fmt.Errorf("client: credential file: pending: %w", err)
		}
		r.Pending = &Pending{RID: rid, Params: p, Mode: codec.Mode(fp.Mode), Received: fp.Received}
	}
	return r, nil
}

// EncodeRecord returns the FileStore form of r.
func EncodeRecord(r *Record) ([]byte, error) {
	ff := fileFormat{Version: fileVersion, SN: r.Identity.SN, IMEI: r.Identity.IMEI, IMSI: r.Identity.IMSI,
		Broker: r.BrokerURL, Current: r.Current, Modified: time.Now().UTC().Truncate(time.Second)}
	if r.Alg != 0 {
		ff.Alg = r.Alg.String()
	}
	if p := r.Pending; p != nil {
		fp := &filePending{RID: p.RID.String(), What: string(p.Params.What), Mode: string(p.Mode), Received: p.Received.UTC()}
		fp.New.Up, fp.New.UpExp = p.Params.Up, p.Params.UpExp
		fp.New.Down, fp.New.DownExp = p.Params.Down, p.Params.DownExp
		fp.New.BK, fp.New.BKExp = p.Params.BK, p.Params.BKExp
		ff.Pending = fp
	}
	return json.MarshalIndent(&ff, "", "  ")
}

// maxBrokerURL bounds a broker URL.
const maxBrokerURL = 2048

// ValidateBrokerURL reports whether u is a broker URL the client can dial:
// tcp://, mqtt://, ssl://, tls://, mqtts://, ws:// or wss://, with a host,
// at most 2048 bytes.
func ValidateBrokerURL(u string) error {
	if len(u) > maxBrokerURL {
		return fmt.Errorf("longer than %d bytes", maxBrokerURL)
	}
	p, err := url.Parse(u)
	if err != nil {
		return errors.New("not a URL")
	}
	switch p.Scheme {
	case "tcp", "mqtt", "ssl", "tls", "mqtts", "ws", "wss":
	default:
		return errors.New("want tcp://, ssl://, ws:// or wss:// (host:port)")
	}
	if p.Host == "" || p.User != nil {
		return errors.New("want scheme://host:port, no user")
	}
	return nil
}

// Load implements CredentialStore. A missing file is ErrNoCredentials.
func (f *FileStore) Load() (*Record, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.load()
}

func (f *FileStore) load() (*Record, error) {
	data, err := os.ReadFile(f.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNoCredentials
	}
	if err != nil {
		return nil, err
	}
	defer clear(data)
	return DecodeRecord(data)
}

// Save replaces the whole record (provisioning a terminal, or a tool
// rewriting the file). It writes atomically.
func (f *FileStore) Save(r *Record) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := r.Current.Validate(); err != nil {
		return err
	}
	if r.BrokerURL != "" {
		if err := ValidateBrokerURL(r.BrokerURL); err != nil {
			return fmt.Errorf("client: broker URL: %w", err)
		}
	}
	return f.write(r)
}

// SavePending implements CredentialStore.
func (f *FileStore) SavePending(p Pending) error {
	return f.update(func(r *Record) bool {
		p.Params = cloneParams(p.Params)
		r.Pending = &p
		return true
	})
}

// Commit implements CredentialStore.
func (f *FileStore) Commit(rid codec.ID) error {
	return f.update(func(r *Record) bool {
		if r.Pending == nil || r.Pending.RID != rid {
			return false
		}
		r.Current = r.New()
		r.Pending = nil
		return true
	})
}

// Discard implements CredentialStore.
func (f *FileStore) Discard(rid codec.ID) error {
	return f.update(func(r *Record) bool {
		if r.Pending == nil || r.Pending.RID != rid {
			return false
		}
		r.Pending = nil
		return true
	})
}

func (f *FileStore) update(fn func(*Record) bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	r, err := f.load()
	if err != nil {
		return err
	}
	if !fn(r) {
		return nil
	}
	return f.write(r)
}

func (f *FileStore) step(name string) error {
	if f.hook != nil {
		return f.hook(name)
	}
	return nil
}

// write replaces the file atomically: temp file in the same directory,
// fsync, rename, fsync of the directory.
func (f *FileStore) write(r *Record) (err error) {
	data, err := EncodeRecord(r)
	if err != nil {
		return err
	}
	defer clear(data)
	dir := filepath.Dir(f.path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(f.path)+".tmp-*")
	if err != nil {
		return err
	}
	tmpName := tmp.Name()
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmpName)
		}
	}()
	if err = tmp.Chmod(0o600); err != nil {
		return err
	}
	half := len(data) / 2
	if _, err = tmp.Write(data[:half]); err != nil {
		return err
	}
	if err = f.step("write"); err != nil {
		return err
	}
	if _, err = tmp.Write(data[half:]); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = f.step("rename"); err != nil {
		return err
	}
	if err = os.Rename(tmpName, f.path); err != nil {
		return err
	}
	if d, derr := os.Open(dir); derr == nil {
		serr := d.Sync()
		d.Close()
		if serr != nil {
			return serr
		}
	}
	return nil
}

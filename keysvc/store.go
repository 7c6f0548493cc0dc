package keysvc

import (
	"context"
	"errors"
	"time"

	"github.com/m2mguard/m2mguard/codec"
)

// Sentinel errors. Stores and the Service wrap them with context
// (fmt.Errorf("keysvc: commit %s: %w", sn, err)); test with errors.Is.
// No error ever carries a password, key or token.
var (
	// ErrNotFound: no terminal, app or change by that name.
	ErrNotFound = errors.New("not found")
	// ErrExists: a create found a record already there.
	ErrExists = errors.New("already exists")
	// ErrConflict: a check-and-set update lost against a concurrent writer.
	ErrConflict = errors.New("version conflict")
	// ErrUnavailable: the backend is unreachable, sealed, closed or timed out.
	ErrUnavailable = errors.New("store unavailable")
	// ErrForbidden: the backend refused the operation (permission denied).
	ErrForbidden = errors.New("permission denied")
	// ErrBusy: a credential change is already pending for the terminal.
	ErrBusy = errors.New("change pending")
	// ErrUnknownRID: the rid names neither the pending nor the last committed change.
	ErrUnknownRID = errors.New("unknown rid")
	// ErrInvalid: bad input (malformed identity, password, record or argument).
	ErrInvalid = errors.New("invalid")
	// ErrInactive: the terminal is not active (an operator disabled it), so no
	// credential change may start, be delivered or commit for it.
	ErrInactive = errors.New("terminal not active")
)

// Status is the administrative state of a terminal.
type Status string

// The statuses. A disabled terminal with valid credentials is refused with
// its own CONNACK code (SPEC section 3, step 10).
const (
	StatusActive   Status = "active"
	StatusDisabled Status = "disabled"
)

// Origins of a change (Change.Origin).
const (
	OriginTerminal = "terminal" // the terminal asked on $m2m/<sn>/ctl
	OriginOperator = "operator" // an operator asked
	OriginExpiry   = "expiry"   // the platform, because a credential expires
)

// Credentials are a terminal's secrets with their expiries (unix seconds,
// codec.Never = never expires).
type Credentials struct {
	Up      []byte // uplink access password
	UpExp   uint32
	Down    []byte // downlink access password
	DownExp uint32
	BK      []byte // basic key, codec.BasicKeySize bytes
	BKExp   uint32
}

// Clone returns a deep copy of c.
func (c Credentials) Clone() Credentials {
	c.Up = cloneBytes(c.Up)
	c.Down = cloneBytes(c.Down)
	c.BK = cloneBytes(c.BK)
	return c
}

// Change is a credential change in flight (SPEC section 7).
type Change struct {
	RID       codec.ID
	What      codec.What
	Mode      codec.Mode
	Origin    string      // OriginTerminal, OriginOperator or OriginExpiry
	New       Credentials // the full new set; fields that do not change are copies of the current ones
	Started   time.Time
	Deadline  time.Time // past it, the change is dropped and the old values stay
	Delivered bool      // the new values were sent (cfg published or SMS sent)
}

// Clone returns a deep copy of c (nil for nil).
func (c *Change) Clone() *Change {
	if c == nil {
		return nil
	}
	n := *c
	n.New = c.New.Clone()
	return &n
}

// Terminal is the stored record of a terminal (SPEC section 1).
//
// A *Terminal returned by a Store, the cache or the Service is shared and
// must be treated as immutable: Clone it before modifying.
type Terminal struct {
	SN, IMEI, IMSI    string
	MSISDN            string // optional, E.164 digits
	Alg               codec.Alg
	Status            Status
	RequireEncryption bool
	Creds             Credentials
	Pending           *Change   // at most one change in flight
	LastCommitted     codec.ID  // rid of the last committed change (0 = none), for idempotent commits
	Created, Updated  time.Time // UTC, second precision
	// Version is the store's opaque check-and-set version, set by the store on
	// read, create and update. Callers copy it, never invent it.
	Version uint64
}

// Clone returns a deep copy of t (nil for nil).
func (t *Terminal) Clone() *Terminal {
	if t == nil {
		return nil
	}
	n := *t
	n.Creds = t.Creds.Clone()
	n.Pending = t.Pending.Clone()
	return &n
}

// Identity returns the terminal's login binding.
func (t *Terminal) Identity() codec.Identity {
	return codec.Identity{SN: t.SN, IMEI: t.IMEI, IMSI: t.IMSI}
}

// App is an application's credentials and topic reach (SPEC section 4).
type App struct {
	Name string
	// PasswordHash is argon2id in PHC string format:
	// $argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<b64 salt>$<b64 hash>.
	PasswordHash string
	Subscribe    []string // MQTT topic filters; default {"m2m/+/up/#"}
	Publish      []string // MQTT topic filters; default {"m2m/+/down/#"}
	Created      time.Time
}

// Clone returns a deep copy of a (nil for nil).
func (a *App) Clone() *App {
	if a == nil {
		return nil
	}
	n := *a
	n.Subscribe = append([]string(nil), a.Subscribe...)
	n.Publish = append([]string(nil), a.Publish...)
	return &n
}

// Store is where terminal records and applications live. Implementations
// must be safe for concurrent use and wrap the sentinel errors of this
// package (ErrUnavailable when the backend cannot be reached or is closed,
// ErrForbidden when it refuses). Records passed in are not retained;
// records returned are fresh copies the caller owns.
//
// The conformance suite in keysvc/storetest checks every implementation.
type Store interface {
	// GetTerminal returns the record of sn, or ErrNotFound.
	GetTerminal(ctx context.Context, sn string) (*Terminal, error)
	// CreateTerminal stores a new record, or fails with ErrExists. It sets t.Version.
	CreateTerminal(ctx context.Context, t *Terminal) error
	// UpdateTerminal replaces the record if its stored version still equals
	// t.Version (check-and-set): ErrConflict if it differs, ErrNotFound if the
	// record is gone. On success it sets t.Version to the new version.
	UpdateTerminal(ctx context.Context, t *Terminal) error
	// DeleteTerminal removes the record of sn, or fails with ErrNotFound.
	DeleteTerminal(ctx context.Context, sn string) error
	// ListTerminals returns up to limit serial numbers greater than after,
	// sorted ascending (byte order); limit <= 0 means no limit.
	ListTerminals(ctx context.Context, after string, limit int) ([]string, error)

	// GetApp returns the application called name, or ErrNotFound.
	GetApp(ctx context.Context, name string) (*App, error)
	// PutApp creates or replaces an application.
	PutApp(ctx context.Context, a *App) error
	// DeleteApp removes an application, or fails with ErrNotFound.
	DeleteApp(ctx context.Context, name string) error
	// ListApps returns the names of all applications, sorted.
	ListApps(ctx context.Context) ([]string, error)

	// Campaigns of credential changes (campaign.go).
	CampaignStore

	// Close releases the store. Operations after Close fail.
	Close() error
}

// BulkCreator is implemented by stores that create many terminals faster
// than one CreateTerminal after another: in one transaction (the embedded
// store) or concurrently (Vault). Import uses it when present. It returns
// one error per record, in order: nil (stored), ErrExists or ErrInvalid
// wrapped (that record refused), or another error (that record failed
// because the store did: the caller stops). A non-nil second result means
// nothing was stored.
type BulkCreator interface {
	CreateTerminals(ctx context.Context, ts []*Terminal) ([]error, error)
}

// BulkReader is implemented by stores that read many terminals faster than
// one GetTerminal after another (Vault: concurrently, with a bound).
// Service.List uses it when present. It returns the records of sns in
// order, nil for one that does not exist; any other failure is the error.
type BulkReader interface {
	GetTerminals(ctx context.Context, sns []string) ([]*Terminal, error)
}

// SessionKeySource issues per-login session keys (SPEC section 5).
type SessionKeySource interface {
	// NewSessionKey returns a fresh codec.SessionKeySize-byte key for a login of sn.
	NewSessionKey(ctx context.Context, sn string) ([]byte, error)
}

func cloneBytes(b []byte) []byte {
	if b == nil {
		return nil
	}
	return append([]byte(nil), b...)
}

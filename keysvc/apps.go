package keysvc

import (
	"context"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/crypto/argon2"

	"github.com/m2mguard/m2mguard/events"
)

// ErrBadCredentials is returned by VerifyApp for an unknown application or
// a wrong password alike, so that the answer does not tell which.
var ErrBadCredentials = errors.New("bad application name or password")

// Default topic reach of an application (SPEC section 4).
var (
	DefaultAppSubscribe = []string{"m2m/+/up/#"}
	DefaultAppPublish   = []string{"m2m/+/down/#"}
)

// AppHashParams are the argon2id costs of application passwords. Stored
// hashes carry their own parameters, so changing these affects only new
// passwords. A zero field takes the value of DefaultAppHashParams.
type AppHashParams struct {
	Time    uint32 // passes
	Memory  uint32 // KiB
	Threads uint8  // lanes
}

// DefaultAppHashParams returns the costs the Service gives each zero field
// of AppHashParams: the OWASP minimum of argon2id (19 MiB, 2 passes, 1
// lane).
func DefaultAppHashParams() AppHashParams {
	return AppHashParams{Time: 2, Memory: 19456, Threads: 1}
}

func (p AppHashParams) withDefaults() AppHashParams {
	def := DefaultAppHashParams()
	if p.Time == 0 {
		p.Time = def.Time
	}
	if p.Memory == 0 {
		p.Memory = def.Memory
	}
	if p.Threads == 0 {
		p.Threads = def.Threads
	}
	return p
}

const (
	saltLen = 16
	hashLen = 32
	// bounds on hashes read back, so a corrupt record cannot ask for
	// gigabytes of memory
	maxArgonMemory = 1 << 21 // KiB: 2 GiB
	maxArgonTime   = 64
)

type phc struct {
	AppHashParams
	salt, hash []byte
}

// hashPassword returns the PHC string of argon2id(password).
func hashPassword(rnd io.Reader, password []byte, p AppHashParams) (string, error) {
	salt := make([]byte, saltLen)
	if _, err := io.ReadFull(rnd, salt); err != nil {
		return "", fmt.Errorf("random: %w", err)
	}
	h := argon2.IDKey(password, salt, p.Time, p.Memory, p.Threads, hashLen)
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, p.Memory, p.Time, p.Threads,
		base64.RawStdEncoding.EncodeToString(salt), base64.RawStdEncoding.EncodeToString(h)), nil
}

// parsePHC parses $argon2id$v=19$m=<m>,t=<t>,p=<p>$<salt>$<hash>. It never
// panics and bounds the costs.
func parsePHC(s string) (phc, error) {
	bad := func(why string) (phc, error) {
		return phc{}, fmt.Errorf("%w: password hash: %s", ErrInvalid, why)
	}
	if len(s) > 256 {
		return bad("too long")
	}
	f := strings.Split(s, "$")
	if len(f) != 6 || f[0] != "" || f[1] != "argon2id" {
		return bad("want $argon2id$v=19$m=..,t=..,p=..$salt$hash")
	}
	if f[2] != "v="+strconv.Itoa(argon2.Version) {
		return bad("unsupported version")
	}
	var p phc
	kv := strings.Split(f[3], ",")
	if len(kv) != 3 {
		return bad("want m=..,t=..,p=..")
	}
	for i, name := range []string{"m=", "t=", "p="} {
		v, ok := strings.CutPrefix(kv[i], name)
		if !ok {
			return bad("want m=..,t=..,p=..")
		}
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || n == 0 {
			return bad("bad parameter")
		}
		switch i {
		case 0:
			p.Memory = uint32(n)
		case 1:
			p.Time = uint32(n)
		case 2:
			if n > 255 {
				return bad("bad parameter")
			}
			p.Threads = uint8(n)
		}
	}
	if p.Memory > maxArgonMemory || p.Time > maxArgonTime || p.Memory < 8*uint32(p.Threads) {
		return bad("costs out of bounds")
	}
	var err error
	if p.salt, err = base64.RawStdEncoding.DecodeString(f[4]); err != nil || len(p.salt) < 8 {
		return bad("bad salt")
	}
	if p.hash, err = base64.RawStdEncoding.DecodeString(f[5]); err != nil || len(p.hash) < 16 || len(p.hash) > 64 {
		return bad("bad hash")
	}
	return p, nil
}

func (p *phc) verify(password []byte) bool {
	h := argon2.IDKey(password, p.salt, p.Time, p.Memory, p.Threads, uint32(len(p.hash)))
	return subtle.ConstantTimeCompare(h, p.hash) == 1
}

// dummyHash is what VerifyApp hashes against for an unknown name, so that
// it costs the same as a known one.
type dummyHash struct {
	once sync.Once
	p    phc
}

func (s *Service) dummyPHC() *phc {
	s.dummy.once.Do(func() {
		s.dummy.p = phc{AppHashParams: s.appHash, salt: make([]byte, saltLen), hash: make([]byte, hashLen)}
	})
	return &s.dummy.p
}

// AddAppRequest describes an application.
type AddAppRequest struct {
	Name      string   // 1-64 of [A-Za-z0-9._-]
	Password  []byte   // 12-128 bytes; stored only as an argon2id hash
	Subscribe []string // topic filters; nil = DefaultAppSubscribe; the only $ filters allowed are under events.TopicPrefix
	Publish   []string // topic filters; nil = DefaultAppPublish; no $ filter
}

// ValidateAppName reports whether name may name an application: 1-64
// characters of [A-Za-z0-9._-], not starting with '.'.
func ValidateAppName(name string) error {
	if len(name) < 1 || len(name) > 64 || name[0] == '.' {
		return fmt.Errorf("%w: app name: want 1 to 64 of [A-Za-z0-9._-]", ErrInvalid)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%w: app name: want 1 to 64 of [A-Za-z0-9._-]", ErrInvalid)
		}
	}
	return nil
}

func validFilter(f string) bool {
	if f == "" || len(f) > 256 || strings.ContainsRune(f, 0) {
		return false
	}
	levels := strings.Split(f, "/")
	for i, l := range levels {
		if l == "#" && i != len(levels)-1 {
			return false
		}
		if l != "#" && l != "+" && strings.ContainsAny(l, "#+") {
			return false
		}
	}
	return true
}

// AppOwnsClientID reports whether an application called name may connect
// with clientID: its name, its name followed by '-' and anything
// ("dash-1"), or an empty ClientID, which the broker replaces with a
// random one. No application can then kick another's live session or
// resume its persistent one. ClientIDs that are valid serial numbers
// belong to terminals whatever this says: an application called "dash"
// connects as "dash-1", not "dash".
func AppOwnsClientID(name, clientID string) bool {
	rest, ok := strings.CutPrefix(clientID, name)
	return clientID == "" || ok && (rest == "" || rest[0] == '-')
}

// appNamesOverlap reports whether two different application names would
// own the same ClientIDs: one is the other followed by '-' and more, as
// "dash" and "dash-east" both own "dash-east-1".
func appNamesOverlap(a, b string) bool {
	return a != b && (AppOwnsClientID(a, b) || AppOwnsClientID(b, a))
}

// AddApp creates or replaces an application. A new name that overlaps an
// existing application's (AppOwnsClientID: "dash" and "dash-east") is
// refused with ErrExists, naming the other application; the check runs
// here only, so whoever writes application records into the store
// directly must keep to the same rule.
func (s *Service) AddApp(ctx context.Context, r AddAppRequest) (*App, error) {
	if err := ValidateAppName(r.Name); err != nil {
		return nil, fmt.Errorf("keysvc: add app: %w", err)
	}
	if len(r.Password) < 12 || len(r.Password) > 128 {
		return nil, fmt.Errorf("keysvc: add app %s: %w: password must be 12 to 128 bytes", r.Name, ErrInvalid)
	}
	if r.Subscribe == nil {
		r.Subscribe = DefaultAppSubscribe
	}
	if r.Publish == nil {
		r.Publish = DefaultAppPublish
	}
	for _, f := range append(append([]string(nil), r.Subscribe...), r.Publish...) {
		if !validFilter(f) {
			return nil, fmt.Errorf("keysvc: add app %s: %w: bad topic filter %q", r.Name, ErrInvalid, f)
		}
	}
	// $ topics are the platform's. The one exception, granted
	// deliberately: subscribing to the event topics (package events).
	for _, f := range r.Subscribe {
		if strings.HasPrefix(f, "$") && !events.IsFilter(f) {
			return nil, fmt.Errorf("keysvc: add app %s: %w: bad topic filter %q: the only $ topics an application may subscribe to are the events under %s",
				r.Name, ErrInvalid, f, events.TopicPrefix)
		}
	}
	for _, f := range r.Publish {
		if strings.HasPrefix(f, "$") {
			return nil, fmt.Errorf("keysvc: add app %s: %w: bad topic filter %q: an application may not publish on $ topics", r.Name, ErrInvalid, f)
		}
	}
	names, err := s.store.ListApps(ctx)
	if err != nil {
		return nil, fmt.Errorf("keysvc: add app %s: %w", r.Name, err)
	}
	for _, other := range names {
		if appNamesOverlap(r.Name, other) {
			longer := max(r.Name, other) // the one that starts with the other
			return nil, fmt.Errorf("keysvc: add app %s: application %s %w with an overlapping name: both would own ClientID %s-1 "+
				"(an application's ClientIDs are its name and its name followed by '-')", r.Name, other, ErrExists, longer)
		}
	}
	h, err := hashPassword(s.rand, r.Password, s.appHash)
	if err != nil {
		return nil, fmt.Errorf("keysvc: add app %s: %w", r.Name, err)
	}
	a := &App{Name: r.Name, PasswordHash: h,
		Subscribe: append([]string(nil), r.Subscribe...), Publish: append([]string(nil), r.Publish...),
		Created: s.now1()}
	if err := s.store.PutApp(ctx, a); err != nil {
		return nil, fmt.Errorf("keysvc: add app %s: %w", r.Name, err)
	}
	return a, nil
}

// GetApp returns an application.
func (s *Service) GetApp(ctx context.Context, name string) (*App, error) {
	if err := ValidateAppName(name); err != nil {
		return nil, fmt.Errorf("keysvc: get app: %w", err)
	}
	a, err := s.store.GetApp(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("keysvc: get app %s: %w", name, err)
	}
	return a, nil
}

// RemoveApp deletes an application.
func (s *Service) RemoveApp(ctx context.Context, name string) error {
	if err := ValidateAppName(name); err != nil {
		return fmt.Errorf("keysvc: remove app: %w", err)
	}
	if err := s.store.DeleteApp(ctx, name); err != nil {
		return fmt.Errorf("keysvc: remove app %s: %w", name, err)
	}
	return nil
}

// ListApps returns the names of all applications.
func (s *Service) ListApps(ctx context.Context) ([]string, error) {
	names, err := s.store.ListApps(ctx)
	if err != nil {
		return nil, fmt.Errorf("keysvc: list apps: %w", err)
	}
	return names, nil
}

// VerifyApp checks an application's password and returns the application.
// An unknown name and a wrong password both give ErrBadCredentials and cost
// the same argon2id work; a store failure is returned as such (wrapping
// ErrUnavailable etc.).
func (s *Service) VerifyApp(ctx context.Context, name string, password []byte) (*App, error) {
	var a *App
	p := s.dummyPHC()
	if ValidateAppName(name) == nil {
		got, err := s.store.GetApp(ctx, name)
		switch {
		case err == nil:
			if q, perr := parsePHC(got.PasswordHash); perr == nil {
				a, p = got, &q
			}
		case !errors.Is(err, ErrNotFound):
			return nil, fmt.Errorf("keysvc: verify app: %w", err)
		}
	}
	ok := p.verify(password)
	if a == nil || !ok {
		return nil, fmt.Errorf("keysvc: verify app: %w", ErrBadCredentials)
	}
	return a, nil
}

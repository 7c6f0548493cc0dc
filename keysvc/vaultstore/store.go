package vaultstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Options configure a Store. The zero value of every field but the
// credentials is useful: Address from $VAULT_ADDR (else
// https://127.0.0.1:8200), and the mount, prefix and timeout of
// DefaultConfig.
type Options struct {
	Address string // Vault address; "" = $VAULT_ADDR
	Mount   string // KV v2 mount; "" = DefaultConfig's
	Prefix  string // path below the mount; "" = DefaultConfig's

	// Exactly one of Token, AppRole and Kubernetes. A token is renewed
	// while it can be; with AppRole or Kubernetes the store logs in again
	// whenever renewal ends (see keepAlive).
	Token      string
	AppRole    *AppRole
	Kubernetes *Kubernetes

	Timeout time.Duration // per request; 0 = DefaultConfig's
	CACert  string        // PEM file to verify Vault's TLS certificate; "" = system roots
	// ListCacheTTL is how long the listing of the terminals path answers
	// pages of ListTerminals (inventory.go); this store's own creates and
	// deletes update it at once. 0 = DefaultListCacheTTL; < 0 = no cache
	// (every page LISTs the whole path).
	ListCacheTTL time.Duration
	// Parallel bounds the concurrent requests of GetTerminals and
	// CreateTerminals (a page of the admin API's list, an import batch);
	// 0 = DefaultParallel.
	Parallel int
	// MaxConns bounds the connections to Vault, open or idle: requests
	// beyond it wait for one (within Timeout) rather than each opening
	// its own, which in a storm of cache misses costs a file descriptor
	// per concurrent read. 0 = DefaultMaxConns.
	MaxConns int
	Logger   *slog.Logger // nil = slog.Default()
	// Metrics, if set, records logins, renewals, the token's TTL and
	// failed requests (see NewMetrics).
	Metrics *Metrics
}

// Store is a keysvc.Store on Vault KV v2. It is safe for concurrent use.
type Store struct {
	client  *vault.Client
	kv      *vault.KVv2
	mount   string
	prefix  string
	log     *slog.Logger
	metrics *Metrics // nil-safe

	// login logs in with the configured method (nil for a plain token);
	// method names it in logs and metrics.
	login  func(ctx context.Context) (*vault.Secret, error)
	method string
	forget func() // clears the credentials held for logins again, at Close

	expires atomic.Int64 // unix nanoseconds when the current token expires; 0 = never

	listing  keyList // the terminals path, listed (inventory.go)
	parallel int

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

var _ keysvc.Store = (*Store)(nil)

// Open connects to Vault, logs in, checks that the token works and starts
// keeping it alive (renewal; with AppRole or Kubernetes, a new login when
// renewal ends). With AppRole.WrappingToken it first unwraps the secret_id,
// once.
func Open(ctx context.Context, opts Options) (*Store, error) {
	if n := btoi(opts.Token != "") + btoi(opts.AppRole != nil) + btoi(opts.Kubernetes != nil); n != 1 {
		return nil, fmt.Errorf("vaultstore: set exactly one of a token, AppRole or Kubernetes credentials: %w", keysvc.ErrInvalid)
	}
	cfg := vault.DefaultConfig()
	if cfg.Error != nil {
		return nil, fmt.Errorf("vaultstore: config: %w", cfg.Error)
	}
	if opts.Address != "" {
		cfg.Address = opts.Address
	}
	def := DefaultConfig()
	cfg.Timeout = opts.Timeout
	if cfg.Timeout <= 0 {
		cfg.Timeout = def.Timeout
	}
	// No retries inside the client: a failed read is answered from the
	// cache (keysvc), and a write is retried by the caller's CAS loop.
	cfg.MaxRetries = 0
	if opts.CACert != "" {
		if err := cfg.ConfigureTLS(&vault.TLSConfig{CACert: opts.CACert}); err != nil {
			return nil, fmt.Errorf("vaultstore: tls: %w", err)
		}
	}
	if err := bindConns(cfg, opts.MaxConns); err != nil {
		return nil, err
	}
	client, err := vault.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("vaultstore: client: %w", err)
	}
	client.SetToken("") // never pick up $VAULT_TOKEN behind the caller's back
	s := &Store{
		client:   client,
		mount:    strings.Trim(opts.Mount, "/"),
		prefix:   strings.Trim(opts.Prefix, "/"),
		log:      opts.Logger,
		metrics:  opts.Metrics,
		method:   MethodToken,
		forget:   func() {},
		listing:  keyList{ttl: opts.ListCacheTTL, now: time.Now},
		parallel: opts.Parallel,
	}
	if s.listing.ttl == 0 {
		s.listing.ttl = DefaultListCacheTTL
	}
	if s.parallel <= 0 {
		s.parallel = DefaultParallel
	}
	if s.mount == "" {
		s.mount = def.Mount
	}
	if s.prefix == "" {
		s.prefix = def.Prefix
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	s.kv = client.KVv2(s.mount)

	var auth *vault.Secret
	switch {
	case opts.AppRole != nil:
		err = s.useAppRole(ctx, opts.AppRole)
	case opts.Kubernetes != nil:
		err = s.useKubernetes(opts.Kubernetes)
	}
	if err != nil {
		return nil, err
	}
	if s.login != nil {
		auth, err = s.logIn(ctx)
	} else {
		client.SetToken(opts.Token)
		auth, err = s.tokenLogin(ctx, opts.Token)
	}
	if err != nil {
		s.forget()
		return nil, err
	}
	bg, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.keepAlive(bg, auth)
	}()
	return s, nil
}

// DefaultMaxConns is the default of Options.MaxConns (and of
// Config.MaxConns): a few times DefaultParallel, and far fewer than one
// per terminal logging in at once.
const DefaultMaxConns = 64

// bindConns bounds the connections of cfg's transport to Vault at n (0 =
// DefaultMaxConns), and keeps as many idle, so that a burst of requests
// reuses them rather than opening new ones and closing them after.
func bindConns(cfg *vault.Config, n int) error {
	if n <= 0 {
		n = DefaultMaxConns
	}
	tr, ok := cfg.HttpClient.Transport.(*http.Transport)
	if !ok {
		return fmt.Errorf("vaultstore: client: unexpected transport %T", cfg.HttpClient.Transport)
	}
	tr.MaxConnsPerHost = n
	tr.MaxIdleConnsPerHost = n
	tr.MaxIdleConns = max(tr.MaxIdleConns, n)
	return nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Close stops the token renewal and forgets the credentials kept for
// logging in again. It does not revoke the token.
func (s *Store) Close() error {
	s.cancel()
	s.wg.Wait()
	s.forget()
	return nil
}

func (s *Store) terminalPath(sn string) string { return path.Join(s.prefix, "terminals", sn) }
func (s *Store) appPath(name string) string    { return path.Join(s.prefix, "apps", name) }

// GetTerminal implements keysvc.Store.
func (s *Store) GetTerminal(ctx context.Context, sn string) (*keysvc.Terminal, error) {
	if err := codec.ValidateSN(sn); err != nil {
		return nil, fmt.Errorf("vaultstore: get terminal: %w: %w", keysvc.ErrInvalid, err)
	}
	p := s.terminalPath(sn)
	sec, err := s.kv.Get(ctx, p)
	if err != nil {
		return nil, s.wrap("get", p, err)
	}
	t, err := decodeTerminal(sec.Data, versionOf(sec))
	if err != nil {
		return nil, fmt.Errorf("vaultstore: get %s: %w", p, err)
	}
	if t.SN != sn {
		return nil, fmt.Errorf("vaultstore: get %s: field \"sn\" names another terminal: %w", p, keysvc.ErrInvalid)
	}
	return t, nil
}

func versionOf(sec *vault.KVSecret) int {
	if sec == nil || sec.VersionMetadata == nil {
		return 0
	}
	return sec.VersionMetadata.Version
}

// CreateTerminal implements keysvc.Store: it writes with cas=0, which Vault
// accepts only if the entry does not exist.
func (s *Store) CreateTerminal(ctx context.Context, t *keysvc.Terminal) error {
	if err := codec.ValidateSN(t.SN); err != nil {
		return fmt.Errorf("vaultstore: create terminal: %w: %w", keysvc.ErrInvalid, err)
	}
	p := s.terminalPath(t.SN)
	sec, err := s.kv.Put(ctx, p, encodeTerminal(t), vault.WithCheckAndSet(0))
	if err != nil {
		err = s.wrap("create", p, err)
		if errors.Is(err, keysvc.ErrConflict) {
			return fmt.Errorf("vaultstore: create %s: %w", p, keysvc.ErrExists)
		}
		return err
	}
	t.Version = uint64(versionOf(sec))
	s.listing.added(t.SN)
	return nil
}

// UpdateTerminal implements keysvc.Store: it writes with cas=t.Version.
func (s *Store) UpdateTerminal(ctx context.Context, t *keysvc.Terminal) error {
	if err := codec.ValidateSN(t.SN); err != nil {
		return fmt.Errorf("vaultstore: update terminal: %w: %w", keysvc.ErrInvalid, err)
	}
	p := s.terminalPath(t.SN)
	if t.Version == 0 {
		if !s.exists(ctx, p) {
			return fmt.Errorf("vaultstore: update %s: %w", p, keysvc.ErrNotFound)
		}
		return fmt.Errorf("vaultstore: update %s: record was never read: %w", p, keysvc.ErrConflict)
	}
	sec, err := s.kv.Put(ctx, p, encodeTerminal(t), vault.WithCheckAndSet(int(t.Version)))
	if err != nil {
		err = s.wrap("update", p, err)
		if errors.Is(err, keysvc.ErrConflict) && !s.exists(ctx, p) {
			return fmt.Errorf("vaultstore: update %s: %w", p, keysvc.ErrNotFound)
		}
		return err
	}
	t.Version = uint64(versionOf(sec))
	return nil
}

// exists reports whether an entry exists; on doubt it says yes, so that a
// CAS conflict is never turned into a false "not found".
func (s *Store) exists(ctx context.Context, p string) bool {
	_, err := s.kv.GetMetadata(ctx, p)
	return !errors.Is(s.wrap("", p, err), keysvc.ErrNotFound)
}

// DeleteTerminal implements keysvc.Store. It removes the entry with all its
// versions (KV v2 metadata delete).
func (s *Store) DeleteTerminal(ctx context.Context, sn string) error {
	if err := codec.ValidateSN(sn); err != nil {
		return fmt.Errorf("vaultstore: delete terminal: %w: %w", keysvc.ErrInvalid, err)
	}
	err := s.delete(ctx, s.terminalPath(sn))
	if err == nil || errors.Is(err, keysvc.ErrNotFound) {
		s.listing.removed(sn)
	}
	return err
}

func (s *Store) delete(ctx context.Context, p string) error {
	if _, err := s.kv.GetMetadata(ctx, p); err != nil {
		return s.wrap("delete", p, err)
	}
	if err := s.kv.DeleteMetadata(ctx, p); err != nil {
		return s.wrap("delete", p, err)
	}
	return nil
}

func (s *Store) list(ctx context.Context, dir string) ([]string, error) {
	p := s.mount + "/metadata/" + dir
	sec, err := s.client.Logical().ListWithContext(ctx, p)
	if err != nil {
		return nil, s.wrap("list", p, err)
	}
	if sec == nil || sec.Data == nil {
		return nil, nil
	}
	raw, _ := sec.Data["keys"].([]any)
	keys := make([]string, 0, len(raw))
	for _, k := range raw {
		if name, ok := k.(string); ok && !strings.HasSuffix(name, "/") {
			keys = append(keys, name)
		}
	}
	sort.Strings(keys)
	return keys, nil
}

// GetApp implements keysvc.Store.
func (s *Store) GetApp(ctx context.Context, name string) (*keysvc.App, error) {
	if err := validateAppName(name); err != nil {
		return nil, err
	}
	p := s.appPath(name)
	sec, err := s.kv.Get(ctx, p)
	if err != nil {
		return nil, s.wrap("get", p, err)
	}
	a, err := decodeApp(sec.Data)
	if err != nil {
		return nil, fmt.Errorf("vaultstore: get %s: %w", p, err)
	}
	return a, nil
}

// PutApp implements keysvc.Store.
func (s *Store) PutApp(ctx context.Context, a *keysvc.App) error {
	if err := validateAppName(a.Name); err != nil {
		return err
	}
	p := s.appPath(a.Name)
	if _, err := s.kv.Put(ctx, p, encodeApp(a)); err != nil {
		return s.wrap("put", p, err)
	}
	return nil
}

// DeleteApp implements keysvc.Store.
func (s *Store) DeleteApp(ctx context.Context, name string) error {
	if err := validateAppName(name); err != nil {
		return err
	}
	return s.delete(ctx, s.appPath(name))
}

// ListApps implements keysvc.Store.
func (s *Store) ListApps(ctx context.Context) ([]string, error) {
	return s.list(ctx, path.Join(s.prefix, "apps"))
}

// validateAppName keeps application names to one path segment.
func validateAppName(name string) error {
	ok := len(name) >= 1 && len(name) <= 64
	for i := 0; ok && i < len(name); i++ {
		c := name[i]
		ok = '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '-' || c == '_' || c == '.'
	}
	if !ok || name == "." || name == ".." {
		return fmt.Errorf("vaultstore: application name: want 1 to 64 of [A-Za-z0-9._-]: %w", keysvc.ErrInvalid)
	}
	return nil
}

// wrap turns a Vault client error into one that wraps a keysvc sentinel
// and names the operation and path (never a token or a secret).
func (s *Store) wrap(op, p string, err error) error {
	if err == nil {
		return nil
	}
	kind, detail := keysvc.ErrUnavailable, "vault unreachable"
	var re *vault.ResponseError
	var ue *url.Error
	var ne net.Error
	switch {
	case errors.Is(err, vault.ErrSecretNotFound):
		kind, detail = keysvc.ErrNotFound, "no such entry"
	case errors.As(err, &re):
		detail = strings.Join(re.Errors, "; ")
		switch {
		case re.StatusCode == http.StatusNotFound:
			kind = keysvc.ErrNotFound
		case re.StatusCode == http.StatusForbidden:
			kind, detail = keysvc.ErrForbidden, "permission denied (token invalid, expired or without a policy for this path)"
		case re.StatusCode == http.StatusBadRequest && strings.Contains(detail, "check-and-set"):
			kind = keysvc.ErrConflict
		case re.StatusCode == http.StatusServiceUnavailable:
			kind, detail = keysvc.ErrUnavailable, "vault is sealed or not ready: "+detail
		case re.StatusCode >= 500 || re.StatusCode == http.StatusTooManyRequests:
			kind = keysvc.ErrUnavailable
		default:
			kind = keysvc.ErrInvalid
		}
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		detail = "timed out"
	case errors.As(err, &ne), errors.As(err, &ue), errors.Is(err, os.ErrDeadlineExceeded):
		detail = "vault unreachable"
	}
	s.metrics.requestFailed(kind)
	if op == "" {
		return fmt.Errorf("vaultstore: %s: %s: %w", p, detail, kind)
	}
	return fmt.Errorf("vaultstore: %s %s: %s: %w", op, p, detail, kind)
}

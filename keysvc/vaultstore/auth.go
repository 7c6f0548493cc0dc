package vaultstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	vault "github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/api/auth/approle"
	"github.com/hashicorp/vault/api/auth/kubernetes"

	"github.com/m2mguard/m2mguard/keysvc"
)

// Auth methods, as named in logs and in m2mguard_vault_logins_total{method}.
const (
	MethodToken      = "token"
	MethodAppRole    = "approle"
	MethodKubernetes = "kubernetes"
)

// DefaultServiceAccountTokenFile is where Kubernetes mounts a pod's service
// account token.
const DefaultServiceAccountTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"

// maxCredentialFile bounds a service account token read from a file.
const maxCredentialFile = 64 << 10

// ErrWrappingToken is the error of a response-wrapping token that does not
// give a secret_id: already unwrapped (by an earlier start of the broker,
// or by someone who intercepted it), expired, revoked, or the wrapping of
// something else. It wraps keysvc.ErrForbidden.
var ErrWrappingToken = fmt.Errorf("wrapping token refused: %w", keysvc.ErrForbidden)

// AppRole are the credentials of an AppRole login: a role_id and either the
// secret_id or a response-wrapping token that holds it.
type AppRole struct {
	MountPath string // "" = DefaultConfig's AppRoleMount
	RoleID    string
	SecretID  []byte
	// WrappingToken, instead of SecretID, is a single-use response-wrapping
	// token of a secret_id (`vault write -wrap-ttl=5m -f
	// auth/approle/role/<role>/secret-id`). Open checks that it wraps a
	// secret_id of this mount, unwraps it once and keeps the secret_id in
	// memory for the logins that follow; a token that was already
	// unwrapped fails with ErrWrappingToken. Every start needs a fresh one.
	WrappingToken []byte
}

// Kubernetes are the credentials of a login with Vault's Kubernetes auth
// method: the pod's service account token (a JWT that Vault checks with the
// Kubernetes TokenReview API) and the Vault role bound to that account.
type Kubernetes struct {
	MountPath string // "" = DefaultConfig's KubernetesMount
	Role      string
	// TokenFile holds the service account token; "" = DefaultConfig's
	// KubernetesTokenFile. It is read at every login, as the
	// kubelet replaces projected tokens before they expire.
	TokenFile string
}

// useAppRole sets the store up to log in with AppRole, unwrapping the
// secret_id first if it came wrapped.
func (s *Store) useAppRole(ctx context.Context, ar *AppRole) error {
	mount := strings.Trim(ar.MountPath, "/")
	if mount == "" {
		mount = DefaultConfig().AppRoleMount
	}
	if ar.RoleID == "" {
		return fmt.Errorf("vaultstore: AppRole: no role_id: %w", keysvc.ErrInvalid)
	}
	if (len(ar.SecretID) == 0) == (len(ar.WrappingToken) == 0) {
		return fmt.Errorf("vaultstore: AppRole: set exactly one of a secret_id and a wrapping token: %w", keysvc.ErrInvalid)
	}
	secretID := bytes.Clone(ar.SecretID)
	if len(ar.WrappingToken) > 0 {
		var err error
		if secretID, err = s.unwrapSecretID(ctx, mount, ar.WrappingToken); err != nil {
			return err
		}
	}
	s.method = MethodAppRole
	s.forget = func() { clear(secretID) }
	s.login = func(ctx context.Context) (*vault.Secret, error) {
		m, err := approle.NewAppRoleAuth(ar.RoleID, &approle.SecretID{FromString: string(secretID)}, approle.WithMountPath(mount))
		if err != nil {
			return nil, fmt.Errorf("vaultstore: AppRole: %w: %w", err, keysvc.ErrInvalid)
		}
		return m.Login(ctx, s.client)
	}
	return nil
}

// unwrapSecretID checks that token wraps a secret_id of the AppRole mount
// (sys/wrapping/lookup, which does not use the token up) and unwraps it.
// Checking first means that a token wrapping anything else is refused
// before it is spent.
func (s *Store) unwrapSecretID(ctx context.Context, mount string, wrapping []byte) ([]byte, error) {
	token := strings.TrimSpace(string(wrapping))
	c, err := s.client.Clone()
	if err != nil {
		return nil, fmt.Errorf("vaultstore: client: %w", err)
	}
	c.SetToken("")
	info, err := c.Logical().WriteWithContext(ctx, "sys/wrapping/lookup", map[string]any{"token": token})
	if err != nil {
		return nil, s.wrappingError("look up", err)
	}
	var created string
	if info != nil {
		created, _ = info.Data["creation_path"].(string)
	}
	if !strings.HasPrefix(created, "auth/"+mount+"/role/") || !strings.HasSuffix(created, "/secret-id") {
		return nil, fmt.Errorf("vaultstore: unwrap the AppRole secret_id: the token wraps the answer of %q, not a secret_id of auth/%s: %w",
			created, mount, ErrWrappingToken)
	}
	c.SetToken(token)
	sec, err := c.Logical().UnwrapWithContext(ctx, "")
	c.SetToken("")
	if err != nil {
		return nil, s.wrappingError("unwrap", err)
	}
	var id string
	if sec != nil {
		id, _ = sec.Data["secret_id"].(string)
	}
	if id == "" {
		return nil, fmt.Errorf("vaultstore: unwrap the AppRole secret_id: the answer has no secret_id: %w", ErrWrappingToken)
	}
	s.log.Info("vault AppRole secret_id unwrapped", "creation_path", created)
	return []byte(id), nil
}

// wrappingError says what a refused wrapping token means; an outage stays
// ErrUnavailable.
func (s *Store) wrappingError(op string, err error) error {
	var re *vault.ResponseError
	if errors.As(err, &re) && re.StatusCode >= 400 && re.StatusCode < 500 {
		s.metrics.requestFailed(keysvc.ErrForbidden)
		return fmt.Errorf("vaultstore: %s the AppRole secret_id: the wrapping token was already unwrapped, has expired or was revoked "+
			"(it is single-use: give every start a fresh one; if no start of this broker used it, someone else may have: "+
			"revoke the role's secret_ids): %w", op, ErrWrappingToken)
	}
	return s.wrap(op+" the AppRole secret_id", "sys/wrapping/"+op, err)
}

// useKubernetes sets the store up to log in with the Kubernetes method.
func (s *Store) useKubernetes(k *Kubernetes) error {
	if k.Role == "" {
		return fmt.Errorf("vaultstore: Kubernetes: no role: %w", keysvc.ErrInvalid)
	}
	def := DefaultConfig()
	mount := strings.Trim(k.MountPath, "/")
	if mount == "" {
		mount = def.KubernetesMount
	}
	file := k.TokenFile
	if file == "" {
		file = def.KubernetesTokenFile
	}
	s.method = MethodKubernetes
	s.login = func(ctx context.Context) (*vault.Secret, error) {
		jwt, err := readCredentialFile(file)
		if err != nil {
			return nil, fmt.Errorf("vaultstore: Kubernetes service account token: %w: %w", err, keysvc.ErrInvalid)
		}
		defer clear(jwt)
		m, err := kubernetes.NewKubernetesAuth(k.Role, kubernetes.WithServiceAccountToken(string(jwt)), kubernetes.WithMountPath(mount))
		if err != nil {
			return nil, fmt.Errorf("vaultstore: Kubernetes: %w: %w", err, keysvc.ErrInvalid)
		}
		return m.Login(ctx, s.client)
	}
	return nil
}

// readCredentialFile reads a small secret file, trimmed; empty is an error.
func readCredentialFile(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxCredentialFile+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(data) > maxCredentialFile {
		return nil, fmt.Errorf("%s: larger than %d bytes", name, maxCredentialFile)
	}
	if t := bytes.TrimSpace(data); len(t) > 0 {
		return t, nil
	}
	return nil, fmt.Errorf("%s: empty", name)
}

// logIn logs in with the configured method and makes the answer's token
// the client's. Failures are counted and wrap keysvc.ErrForbidden
// (credentials refused) or keysvc.ErrUnavailable.
func (s *Store) logIn(ctx context.Context) (*vault.Secret, error) {
	sec, err := s.login(ctx)
	if err == nil && (sec == nil || sec.Auth == nil || sec.Auth.ClientToken == "") {
		err = fmt.Errorf("vaultstore: log in with %s: no token in the answer: %w", s.method, keysvc.ErrForbidden)
	}
	if err != nil {
		s.metrics.loggedIn(s.method, false)
		var re *vault.ResponseError
		switch {
		case errors.Is(err, keysvc.ErrForbidden), errors.Is(err, keysvc.ErrInvalid):
			return nil, err
		case errors.As(err, &re) && (re.StatusCode == 400 || re.StatusCode == 403):
			// Vault answers 400 or 403 to a wrong role_id, secret_id or
			// service account token; its message says which, never the value.
			s.metrics.requestFailed(keysvc.ErrForbidden)
			return nil, fmt.Errorf("vaultstore: log in with %s: refused by Vault (%s): %w", s.method, strings.Join(re.Errors, "; "), keysvc.ErrForbidden)
		default:
			return nil, s.wrap("log in with "+s.method, "auth/"+s.method, err)
		}
	}
	s.client.SetToken(sec.Auth.ClientToken)
	s.metrics.loggedIn(s.method, true)
	s.setExpiry(expiryOf(time.Now(), sec.Auth.LeaseDuration))
	return sec, nil
}

// tokenLogin checks the token and returns it as an auth secret, the form
// the LifetimeWatcher renews.
func (s *Store) tokenLogin(ctx context.Context, token string) (*vault.Secret, error) {
	self, err := s.client.Auth().Token().LookupSelfWithContext(ctx)
	if err != nil {
		s.metrics.loggedIn(MethodToken, false)
		return nil, s.wrap("log in", "auth/token/lookup-self", err)
	}
	renewable, _ := self.TokenIsRenewable()
	ttl, _ := self.TokenTTL()
	s.metrics.loggedIn(MethodToken, true)
	s.setExpiry(expiryOf(time.Now(), int(ttl.Seconds())))
	return &vault.Secret{Auth: &vault.SecretAuth{
		ClientToken: token, Renewable: renewable, LeaseDuration: int(ttl.Seconds()),
	}}, nil
}

// setExpiry records when the current token expires (zero: never).
func (s *Store) setExpiry(t time.Time) {
	var ns int64
	if !t.IsZero() {
		ns = t.UnixNano()
	}
	s.expires.Store(ns)
	s.metrics.setExpiry(ns)
}

// expiry is when the current token expires; zero if it never does.
func (s *Store) expiry() time.Time {
	if ns := s.expires.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// expiryOf is when a token with a TTL of ttl seconds expires; zero for a
// token that never does.
func expiryOf(now time.Time, ttl int) time.Time {
	if ttl <= 0 {
		return time.Time{}
	}
	return now.Add(time.Duration(ttl) * time.Second)
}

// keepAlive keeps the store's token valid until ctx ends: it renews the
// token while Vault allows (every renewal, and every failed one, counted);
// with a login method it logs in again when renewal ends (max TTL reached,
// a renewal failed) or, for a token that cannot be renewed (batch tokens),
// after two thirds of its TTL. Failed logins are retried with exponential
// back-off and jitter, up to a minute apart. A plain token cannot be
// replaced: a failed renewal is retried while the token lives, and its
// coming expiry is logged.
func (s *Store) keepAlive(ctx context.Context, auth *vault.Secret) {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval, bo.MaxInterval, bo.MaxElapsedTime = time.Second, time.Minute, 0
	for {
		err := s.renew(ctx, auth)
		if ctx.Err() != nil {
			return
		}
		if s.login == nil {
			left := time.Until(s.expiry())
			if err == nil || left <= 0 {
				s.log.Warn("vault token cannot be renewed further; give the broker a new token before it expires", "expires_in", left.Round(time.Second))
				<-ctx.Done()
				return
			}
			s.log.Warn("vault token renewal failed; retrying", "err", err.Error(), "expires_in", left.Round(time.Second))
			if !sleep(ctx, bo.NextBackOff()) {
				return
			}
			auth = &vault.Secret{Auth: &vault.SecretAuth{ClientToken: auth.Auth.ClientToken, Renewable: true, LeaseDuration: int(left.Seconds())}}
			continue
		}
		if err != nil {
			s.log.Warn("vault token renewal failed; logging in again", "method", s.method, "err", err.Error())
		}
		for {
			a, err := s.logIn(ctx)
			if err == nil {
				s.log.Info("vault login renewed", "method", s.method, "ttl", time.Duration(a.Auth.LeaseDuration)*time.Second)
				auth = a
				bo.Reset()
				break
			}
			wait := bo.NextBackOff()
			s.log.Warn("vault login failed; retrying", "method", s.method, "err", err.Error(), "retry_in", wait.Round(time.Millisecond))
			if !sleep(ctx, wait) {
				return
			}
		}
	}
}

// renew keeps auth's token renewed until renewal ends: nil when Vault
// will not renew it further (max TTL, or a token that is not renewable,
// after two thirds of its TTL), the error of a failed renewal, or nil when
// ctx ends. The LifetimeWatcher's goroutine ends before renew returns.
func (s *Store) renew(ctx context.Context, auth *vault.Secret) error {
	a := auth.Auth
	if a == nil || a.LeaseDuration <= 0 {
		<-ctx.Done() // a token without a TTL never needs renewing
		return nil
	}
	if !a.Renewable {
		if s.login != nil {
			sleep(ctx, time.Duration(a.LeaseDuration)*time.Second*2/3)
		}
		return nil
	}
	w, err := s.client.NewLifetimeWatcher(&vault.LifetimeWatcherInput{Secret: auth, RenewBehavior: vault.RenewBehaviorErrorOnErrors})
	if err != nil {
		return err
	}
	done := w.DoneCh()
	go w.Start()
	for {
		select {
		case <-ctx.Done():
			w.Stop()
			<-done
			return nil
		case err := <-done:
			if err != nil {
				s.metrics.renewed(false)
				return s.wrap("renew token", "auth/token/renew-self", err)
			}
			return nil
		case r := <-w.RenewCh():
			s.metrics.renewed(true)
			if r.Secret != nil && r.Secret.Auth != nil {
				s.setExpiry(expiryOf(r.RenewedAt, r.Secret.Auth.LeaseDuration))
			}
			s.log.Debug("vault token renewed")
		}
	}
}

// sleep waits d or until ctx ends; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

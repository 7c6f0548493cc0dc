package fleet

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
)

// ErrConfig is wrapped by every error Open and StartNode return for options
// that cannot work (a missing broker id, a URL off loopback without TLS, no
// credentials): errors.Is(err, ErrConfig) tells a configuration mistake
// from an unreachable cluster.
var ErrConfig = errors.New("fleet: configuration")

// Options configure a broker's connection to the fleet. URLs and BrokerID
// are required; every other zero value is usable on loopback.
type Options struct {
	// URLs are the NATS servers (nats://host:port or tls://host:port); the
	// client discovers the rest of the cluster from them.
	URLs []string
	// BrokerID names this broker in the fleet: the session directory, the
	// events it publishes and its request subject carry it. 1 to 64 of
	// [A-Za-z0-9_-], unique in the fleet.
	BrokerID string

	// Credentials: at most one of user and password, token, NKeySeedFile
	// and CredsFile. Open refuses to connect without one unless every URL
	// is on loopback.
	User     string
	Password []byte
	Token    []byte
	// NKeySeedFile is a file holding an NKey user seed (SU...).
	NKeySeedFile string
	// CredsFile is a NATS .creds file (a user JWT and its seed).
	CredsFile string

	// TLS configures the client side of TLS. Open refuses a URL that is
	// not on loopback unless TLS is configured (TLS.CAFile or TLS.Config
	// set, or a tls:// URL, which verifies against the system roots).
	TLS TLSOptions

	// Skew is the hook's skew window (auth.skew); the replay bucket keeps
	// a claim for 2 × Skew + ClaimMargin. 0 = 300 s. Every broker of a
	// fleet must use the same value.
	Skew time.Duration
	// ClaimMargin is added to 2 × Skew for the life of a claim: it covers
	// the hook's own margin (1 min) and clocks that differ between brokers
	// and NATS servers. 0 = 2 min; tests shorten it.
	ClaimMargin time.Duration
	// Replicas of every bucket and stream; 0 = 3, or 1 on a server
	// without a cluster. Open waits (until its context ends) for the
	// cluster to place them: set 1 or 2 for a smaller cluster.
	Replicas int
	// ClaimTimeout bounds a replay claim, retries included, so that it
	// outlasts a leader election; then Claim returns an error and the
	// login is refused (fail closed). 0 = 2 s.
	ClaimTimeout time.Duration
	// RequestTimeout bounds Request and each broker's share of Gather when
	// the caller's context has no earlier deadline. 0 = 1 s.
	RequestTimeout time.Duration
	// Heartbeat is how often the broker renews its liveness key; a broker
	// that has not renewed it for 3 × Heartbeat counts as gone (Gather
	// stops waiting for it, the directory sweep removes its sessions).
	// 0 = 2 s. Every broker of a fleet must use the same value.
	Heartbeat time.Duration
	// SweepEvery is how often the holder of the fleet's "directory-sweep"
	// lease removes the sessions of brokers that are gone; 0 = 10 s,
	// negative = never (the caller sweeps with Directory.Sweep).
	SweepEvery time.Duration

	// Logger receives connection and availability events; nil =
	// slog.Default(). It never sees a credential.
	Logger *slog.Logger
	// Registerer receives the fleet's metrics; nil = none are exported.
	Registerer prometheus.Registerer

	natsExtra []nats.Option // tests: more options of the connection
}

// TLSOptions configure TLS for a client connection (Options.TLS) or for a
// node's listener (NodeOptions.TLS, NodeOptions.RouteTLS).
type TLSOptions struct {
	// CAFile verifies the other side: the server for a client, the client
	// (or peer) certificates for a listener, which then requires them.
	CAFile string
	// CertFile and KeyFile are this side's certificate and key (PEM):
	// required for a listener, the client certificate for a client.
	CertFile, KeyFile string
	// ServerName overrides the name a client verifies the server's
	// certificate for.
	ServerName string
	// Config, when set, is used as it is and the fields above are ignored.
	Config *tls.Config
}

func (t TLSOptions) configured() bool { return t.Config != nil || t.CAFile != "" || t.CertFile != "" }

// clientConfig builds the tls.Config of a client connection.
func (t TLSOptions) clientConfig() (*tls.Config, error) {
	if t.Config != nil {
		return t.Config.Clone(), nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if t.CAFile != "" {
		pool, err := loadPool(t.CAFile)
		if err != nil {
			return nil, err
		}
		c.RootCAs = pool
	}
	if t.CertFile != "" || t.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("%w: tls client certificate: %w", ErrConfig, err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// serverConfig builds the tls.Config of a listener; with a CA it requires
// and verifies the other side's certificate (mutual TLS).
func (t TLSOptions) serverConfig() (*tls.Config, error) {
	if t.Config != nil {
		return t.Config.Clone(), nil
	}
	cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("%w: tls certificate: %w", ErrConfig, err)
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	if t.CAFile != "" {
		pool, err := loadPool(t.CAFile)
		if err != nil {
			return nil, err
		}
		c.ClientCAs = pool
		c.RootCAs = pool // a route dials its peers with the same config
		c.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return c, nil
}

func loadPool(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("%w: tls ca: %w", ErrConfig, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%w: tls ca %s: no PEM certificate", ErrConfig, file)
	}
	return pool, nil
}

// Defaults of Options.
const (
	DefaultSkew           = 300 * time.Second
	DefaultClaimTimeout   = 2 * time.Second
	DefaultRequestTimeout = time.Second
	DefaultHeartbeat      = 2 * time.Second
	DefaultSweepEvery     = 10 * time.Second
	DefaultClaimMargin    = 2 * time.Minute
)

var brokerIDRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

func (o Options) withDefaults() (Options, error) {
	if !brokerIDRE.MatchString(o.BrokerID) {
		return o, fmt.Errorf("%w: broker id %q: 1 to 64 of [A-Za-z0-9_-]", ErrConfig, o.BrokerID)
	}
	if len(o.URLs) == 0 {
		return o, fmt.Errorf("%w: no NATS URL", ErrConfig)
	}
	creds := 0
	for _, set := range []bool{o.User != "" || len(o.Password) > 0, len(o.Token) > 0, o.NKeySeedFile != "", o.CredsFile != ""} {
		if set {
			creds++
		}
	}
	if creds > 1 {
		return o, fmt.Errorf("%w: more than one kind of NATS credentials", ErrConfig)
	}
	allLoopback := true
	for _, u := range o.URLs {
		tlsURL, loop, err := inspectURL(u)
		if err != nil {
			return o, err
		}
		allLoopback = allLoopback && loop
		if !loop && !tlsURL && !o.TLS.configured() {
			return o, fmt.Errorf("%w: NATS URL %s is not on loopback: TLS required (a tls:// URL or a TLS CA)", ErrConfig, redactURL(u))
		}
	}
	if creds == 0 && !allLoopback {
		return o, fmt.Errorf("%w: NATS credentials required off loopback (user and password, token, nkey seed or creds file)", ErrConfig)
	}
	if o.Skew <= 0 {
		o.Skew = DefaultSkew
	}
	if o.ClaimMargin <= 0 {
		o.ClaimMargin = DefaultClaimMargin
	}
	if o.ClaimTimeout <= 0 {
		o.ClaimTimeout = DefaultClaimTimeout
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.Heartbeat <= 0 {
		o.Heartbeat = DefaultHeartbeat
	}
	if o.SweepEvery == 0 {
		o.SweepEvery = DefaultSweepEvery
	}
	if o.Replicas < 0 || o.Replicas > 5 {
		return o, fmt.Errorf("%w: replicas %d: 0 to 5", ErrConfig, o.Replicas)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o, nil
}

// inspectURL reports whether a NATS URL asks for TLS and whether its host
// is on loopback. A URL may carry no scheme (host:port).
func inspectURL(raw string) (tlsURL, loopback bool, err error) {
	s := raw
	if !strings.Contains(s, "://") {
		s = "nats://" + s
	}
	u, err := url.Parse(s)
	if err != nil || u.Hostname() == "" {
		return false, false, fmt.Errorf("%w: NATS URL %q", ErrConfig, redactURL(raw))
	}
	if u.User != nil {
		return false, false, fmt.Errorf("%w: NATS URL %s carries credentials: use the credential options", ErrConfig, redactURL(raw))
	}
	switch u.Scheme {
	case "nats":
	case "tls":
		tlsURL = true
	default:
		return false, false, fmt.Errorf("%w: NATS URL %s: scheme nats:// or tls://", ErrConfig, redactURL(raw))
	}
	return tlsURL, isLoopback(u.Hostname()), nil
}

// isLoopback reports whether host is localhost or a loopback address.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// redactURL drops any user information from a URL for an error message.
func redactURL(raw string) string {
	if u, err := url.Parse(raw); err == nil && u.User != nil {
		u.User = url.User("redacted")
		return u.String()
	}
	return raw
}

// natsOptions turns the options into nats.go's, credentials and TLS
// included.
func (o Options) natsOptions(handlers []nats.Option) ([]nats.Option, error) {
	opts := []nats.Option{
		nats.Name("m2mguard-" + o.BrokerID),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.ReconnectJitter(100*time.Millisecond, time.Second),
		nats.PingInterval(5 * time.Second),
		nats.MaxPingsOutstanding(2),
		nats.Timeout(2 * time.Second),
		nats.RetryOnFailedConnect(true),
		nats.ReconnectBufSize(1 << 20),
	}
	switch {
	case o.User != "" || len(o.Password) > 0:
		opts = append(opts, nats.UserInfo(o.User, string(o.Password)))
	case len(o.Token) > 0:
		opts = append(opts, nats.Token(string(o.Token)))
	case o.NKeySeedFile != "":
		opt, err := nats.NkeyOptionFromSeed(o.NKeySeedFile)
		if err != nil {
			return nil, fmt.Errorf("%w: nkey seed file: %w", ErrConfig, err)
		}
		opts = append(opts, opt)
	case o.CredsFile != "":
		if _, err := os.Stat(o.CredsFile); err != nil {
			return nil, fmt.Errorf("%w: creds file: %w", ErrConfig, err)
		}
		opts = append(opts, nats.UserCredentials(o.CredsFile))
	}
	if o.TLS.configured() {
		c, err := o.TLS.clientConfig()
		if err != nil {
			return nil, err
		}
		opts = append(opts, nats.Secure(c))
	}
	opts = append(opts, o.natsExtra...)
	return append(opts, handlers...), nil
}

package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// NodeOptions configure an embedded NATS server (StartNode): one per broker,
// routed to its peers, so that a fleet of N brokers needs no other service.
type NodeOptions struct {
	// Name is the server's name, unique in the cluster and stable across
	// restarts (JetStream's Raft groups know peers by it). Required.
	Name string
	// StoreDir is where JetStream keeps its files. Required.
	StoreDir string

	// Host and Port are the client listener; "" = 127.0.0.1, 0 = an
	// ephemeral port (tests: set it in production).
	Host string
	Port int
	// ClusterName names the cluster; every node of it must use the same.
	// Empty = a single node without a route listener.
	ClusterName string
	// ClusterHost and ClusterPort are the route listener; "" = Host, 0 =
	// an ephemeral port.
	ClusterHost string
	ClusterPort int
	// Routes are the route URLs (nats-route://host:port) of the cluster's
	// nodes; this node's own may be among them.
	Routes []string

	// Client authentication: users with passwords, a token, or NKey public
	// keys (U...); any mix. StartNode refuses a listener off loopback
	// without any.
	Users []NodeUser
	Token []byte
	NKeys []string
	// RouteUser and RoutePassword authenticate routes both ways: the node
	// requires them from its peers and presents them to its peers.
	// Required when ClusterName is set and the route listener is off
	// loopback.
	RouteUser     string
	RoutePassword []byte

	// TLS for the client listener and for routes: CertFile and KeyFile are
	// required; with CAFile the other side must present a certificate
	// signed by it (required for routes off loopback).
	TLS      *TLSOptions
	RouteTLS *TLSOptions

	// MaxStore bounds JetStream's file storage in bytes; 0 = 1 GiB.
	MaxStore int64
	// SyncInterval is how often JetStream fsyncs its files: a power loss
	// of every node at once loses at most the claims of the last
	// interval, as the single broker's replay file does. 0 = 1 s (NATS's
	// own default is 2 min).
	SyncInterval time.Duration
	// ReadyTimeout bounds the start; 0 = 10 s.
	ReadyTimeout time.Duration
	// Logger receives the server's own log: its notices at Debug (NATS is
	// chatty), warnings and errors as they are. nil = slog.Default().
	Logger *slog.Logger
}

// NodeUser is a user allowed on a node's client listener.
type NodeUser struct {
	Name     string
	Password []byte
}

// Node is an embedded NATS server with JetStream.
type Node struct {
	srv  *server.Server
	opts NodeOptions
}

// StartNode starts an embedded NATS server and returns once it accepts
// connections. In a cluster, JetStream is usable only once a meta leader is
// elected, which needs a majority of the nodes: wait with WaitJetStream (or
// let Open retry until its context ends).
func StartNode(o NodeOptions) (*Node, error) {
	sopts, err := o.serverOptions()
	if err != nil {
		return nil, err
	}
	srv, err := server.NewServer(sopts)
	if err != nil {
		return nil, fmt.Errorf("fleet: nats node %s: %w", o.Name, err)
	}
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	srv.SetLoggerV2(natsLogger{log.With("nats_node", o.Name)}, false, false, false)
	srv.Start()
	timeout := o.ReadyTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	if !srv.ReadyForConnections(timeout) {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil, fmt.Errorf("fleet: nats node %s: not ready within %s", o.Name, timeout)
	}
	return &Node{srv: srv, opts: o}, nil
}

func (o NodeOptions) serverOptions() (*server.Options, error) {
	if o.Name == "" || o.StoreDir == "" {
		return nil, fmt.Errorf("%w: nats node needs a name and a store dir", ErrConfig)
	}
	host := o.Host
	if host == "" {
		host = "127.0.0.1"
	}
	s := &server.Options{
		ServerName:         o.Name,
		Host:               host,
		Port:               portOrRandom(o.Port),
		JetStream:          true,
		StoreDir:           o.StoreDir,
		JetStreamMaxStore:  o.MaxStore,
		JetStreamMaxMemory: 64 << 20,
		NoSigs:             true,
		MaxPayload:         1 << 20,
	}
	s.SyncInterval = o.SyncInterval
	if s.SyncInterval <= 0 {
		s.SyncInterval = time.Second
	}
	if s.JetStreamMaxStore <= 0 {
		s.JetStreamMaxStore = 1 << 30
	}
	auth := len(o.Users) > 0 || len(o.Token) > 0 || len(o.NKeys) > 0
	if !auth && !isLoopback(host) {
		return nil, fmt.Errorf("%w: nats node %s: client listener %s without authentication", ErrConfig, o.Name, host)
	}
	if len(o.Token) > 0 && (len(o.Users) > 0 || len(o.NKeys) > 0) {
		return nil, fmt.Errorf("%w: nats node %s: a token cannot be combined with users or nkeys", ErrConfig, o.Name)
	}
	for _, u := range o.Users {
		s.Users = append(s.Users, &server.User{Username: u.Name, Password: string(u.Password)})
	}
	for _, k := range o.NKeys {
		s.Nkeys = append(s.Nkeys, &server.NkeyUser{Nkey: k})
	}
	if len(o.Token) > 0 {
		s.Authorization = string(o.Token)
	}
	if o.TLS != nil {
		c, err := o.TLS.serverConfig()
		if err != nil {
			return nil, err
		}
		s.TLSConfig, s.TLS, s.TLSVerify = c, true, o.TLS.CAFile != ""
		s.TLSTimeout = 2
	}
	if o.ClusterName == "" {
		return s, nil
	}
	chost := o.ClusterHost
	if chost == "" {
		chost = host
	}
	s.Cluster = server.ClusterOpts{
		Name: o.ClusterName, Host: chost, Port: portOrRandom(o.ClusterPort),
		Username: o.RouteUser, Password: string(o.RoutePassword),
	}
	if !isLoopback(chost) {
		if o.RouteUser == "" || len(o.RoutePassword) == 0 {
			return nil, fmt.Errorf("%w: nats node %s: route listener %s without route credentials", ErrConfig, o.Name, chost)
		}
		if o.RouteTLS == nil || o.RouteTLS.CAFile == "" && o.RouteTLS.Config == nil {
			return nil, fmt.Errorf("%w: nats node %s: route listener %s without mutual TLS", ErrConfig, o.Name, chost)
		}
	}
	if o.RouteTLS != nil {
		c, err := o.RouteTLS.serverConfig()
		if err != nil {
			return nil, err
		}
		s.Cluster.TLSConfig, s.Cluster.TLSTimeout = c, 2
	}
	for _, r := range o.Routes {
		u, err := url.Parse(r)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("%w: nats node %s: route %q", ErrConfig, o.Name, r)
		}
		if u.User != nil {
			return nil, fmt.Errorf("%w: nats node %s: route %s carries credentials: use RouteUser", ErrConfig, o.Name, redactURL(r))
		}
		if o.RouteUser != "" {
			u.User = url.UserPassword(o.RouteUser, string(o.RoutePassword))
		}
		s.Routes = append(s.Routes, u)
	}
	return s, nil
}

func portOrRandom(p int) int {
	if p == 0 {
		return server.RANDOM_PORT
	}
	return p
}

// ClientURL is the URL clients connect to (nats:// even with TLS: the
// client upgrades when the server requires it).
func (n *Node) ClientURL() string { return n.srv.ClientURL() }

// RouteURL is the URL peers route to (nats-route://host:port), "" without
// a cluster.
func (n *Node) RouteURL() string {
	a := n.srv.ClusterAddr()
	if a == nil {
		return ""
	}
	return "nats-route://" + net.JoinHostPort(a.IP.String(), strconv.Itoa(a.Port))
}

// Name is the node's server name.
func (n *Node) Name() string { return n.opts.Name }

// JetStreamReady reports whether JetStream can serve requests through this
// node: enabled and, in a cluster, following a known meta leader and
// caught up with it.
func (n *Node) JetStreamReady() bool {
	if !n.srv.JetStreamEnabled() {
		return false
	}
	if !n.srv.JetStreamIsClustered() {
		return true
	}
	return n.srv.JetStreamIsCurrent() && n.srv.Healthz(&server.HealthzOptions{JSMetaOnly: true}).Error == ""
}

// IsMetaLeader reports whether this node leads JetStream's meta group.
func (n *Node) IsMetaLeader() bool { return n.srv.JetStreamIsLeader() }

// IsStreamLeader reports whether this node leads the Raft group of a
// stream (a KV bucket's stream is "KV_" + the bucket name), in the global
// account.
func (n *Node) IsStreamLeader(stream string) bool {
	return n.srv.JetStreamIsStreamLeader(server.DEFAULT_GLOBAL_ACCOUNT, stream)
}

// ErrNotReady is returned by WaitJetStream, and wrapped by Open's error,
// when the context ends before JetStream answers.
var ErrNotReady = errors.New("fleet: jetstream not ready")

// WaitJetStream waits until JetStreamReady, polling, or ctx ends.
func (n *Node) WaitJetStream(ctx context.Context) error {
	t := time.NewTicker(25 * time.Millisecond)
	defer t.Stop()
	for !n.JetStreamReady() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: node %s: %w", ErrNotReady, n.opts.Name, ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// Shutdown stops the node and waits until it has.
func (n *Node) Shutdown() {
	n.srv.Shutdown()
	n.srv.WaitForShutdown()
}

// natsLogger hands the server's log to slog.
type natsLogger struct{ l *slog.Logger }

func (g natsLogger) Noticef(format string, v ...any) { g.log(slog.LevelDebug, format, v) }
func (g natsLogger) Warnf(format string, v ...any)   { g.log(slog.LevelWarn, format, v) }
func (g natsLogger) Fatalf(format string, v ...any)  { g.log(slog.LevelError, format, v) }
func (g natsLogger) Errorf(format string, v ...any)  { g.log(slog.LevelError, format, v) }
func (g natsLogger) Debugf(format string, v ...any)  {}
func (g natsLogger) Tracef(format string, v ...any)  {}

func (g natsLogger) log(level slog.Level, format string, v []any) {
	ctx := context.Background()
	if g.l.Enabled(ctx, level) {
		g.l.Log(ctx, level, "nats: "+fmt.Sprintf(format, v...))
	}
}

package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/fleetlink"
	"github.com/m2mguard/m2mguard/fleetroute"
)

// joinFleet starts the embedded NATS node (cluster.embedded_nats), opens
// the fleet and creates the broker's link to it. It waits, logging, until
// JetStream answers (a majority of the nodes is up) or ctx ends.
func (b *Broker) joinFleet(ctx context.Context) error {
	cl := b.cfg.Cluster
	log := b.log.With("component", "fleet")
	opts := fleet.Options{
		URLs: append([]string(nil), cl.NATSURLs...), BrokerID: cl.BrokerID,
		NKeySeedFile: cl.NATSNKeyFile, CredsFile: cl.NATSCredsFile,
		TLS:  fleet.TLSOptions{CAFile: cl.NATSCA, CertFile: cl.NATSCert, KeyFile: cl.NATSKey},
		Skew: b.cfg.Auth.Skew, Replicas: cl.Replicas, ClaimTimeout: cl.ClaimTimeout, Heartbeat: cl.Heartbeat,
		// A call to another broker (a change start there) may write to
		// Vault and tell the fleet: more than fleet's 1 s.
		RequestTimeout: 5 * time.Second,
		Logger:         log, Registerer: b.registry,
	}
	if cl.NATSUser != "" {
		pw, err := valueOrFile(cl.NATSPassword, cl.NATSPasswordFile, "cluster.nats_password_file")
		if err != nil {
			return err
		}
		opts.User, opts.Password = cl.NATSUser, []byte(pw)
	}
	if cl.NATSTokenFile != "" {
		tok, err := valueOrFile("", cl.NATSTokenFile, "cluster.nats_token_file")
		if err != nil {
			return err
		}
		opts.Token = []byte(tok)
	}
	if cl.EmbeddedNATS {
		if err := b.startNode(opts); err != nil {
			return err
		}
		opts.URLs = append([]string{b.node.ClientURL()}, opts.URLs...)
	}
	waiting := time.AfterFunc(5*time.Second, func() {
		log.Warn("waiting for the fleet's JetStream: a majority of its NATS nodes must be up", "urls", fmt.Sprint(opts.URLs))
	})
	f, err := fleet.Open(ctx, opts)
	waiting.Stop()
	if err != nil {
		if errors.Is(err, fleet.ErrConfig) {
			return &ConfigError{Key: "cluster", Err: err}
		}
		return fmt.Errorf("fleet: %w", err)
	}
	b.fleet = f
	b.link, err = fleetlink.New(ctx, fleetlink.Options{Fleet: f, Logger: b.log, Registerer: b.registry})
	if err != nil {
		return fmt.Errorf("fleet: %w", err)
	}
	log.Info("fleet joined", "broker_id", cl.BrokerID, "replicas", f.Replicas(), "embedded_nats", cl.EmbeddedNATS)
	return nil
}

// routeFleet creates the fleet's downlink and uplink routing
// (b.downlinks, b.uplinks) at once: each waits for JetStream to create
// its streams, on a fresh cluster a Raft election each. The server must
// exist; the hooks are added by the caller, in its order.
func (b *Broker) routeFleet(ctx context.Context, log *slog.Logger) error {
	cfg := b.cfg
	var derr, uerr error
	var wg sync.WaitGroup
	wg.Go(func() {
		b.downlinks, derr = fleetroute.NewDownlinks(ctx, fleetroute.DownlinkOptions{
			Fleet: b.fleet, Server: b.server, Ready: func(sn string) bool { return b.hook.DownlinkReady(sn) },
			Queue: cfg.Cluster.DownlinkQueue, MaxAge: cfg.MQTT.SessionExpiry, AppendTimeout: cfg.Cluster.ClaimTimeout + time.Second,
			Logger: log, Registerer: b.registry,
		})
	})
	wg.Go(func() {
		u := cfg.Cluster.Uplinks
		b.uplinks, uerr = fleetroute.NewUplinks(ctx, fleetroute.UplinkOptions{Fleet: b.fleet, Server: b.server,
			MaxAge: u.MaxAge, MaxBytes: int64(u.MaxBytes), RetainedMaxBytes: int64(u.RetainedMaxBytes),
			AckTimeout: u.AckTimeout, MaxAckPending: u.MaxAckPending,
			Logger: log, Registerer: b.registry})
	})
	wg.Wait()
	if err := errors.Join(derr, uerr); err != nil {
		return fmt.Errorf("fleet: %w", err)
	}
	return nil
}

// startNode starts the embedded NATS node; its clients authenticate as the
// broker does (opts' user and password, or token).
func (b *Broker) startNode(opts fleet.Options) error {
	e := b.cfg.Cluster.Embedded
	host, port, err := splitListen(e.Listen)
	if err != nil {
		return &ConfigError{Key: "cluster.embedded.listen", Err: err}
	}
	no := fleet.NodeOptions{
		Name: b.cfg.Cluster.BrokerID, StoreDir: e.StoreDir, Host: host, Port: port,
		Routes: e.Routes, Token: opts.Token, Logger: b.log.With("component", "nats"),
	}
	if opts.User != "" {
		no.Users = []fleet.NodeUser{{Name: opts.User, Password: opts.Password}}
	}
	if e.ClusterListen != "" {
		if no.ClusterHost, no.ClusterPort, err = splitListen(e.ClusterListen); err != nil {
			return &ConfigError{Key: "cluster.embedded.cluster_listen", Err: err}
		}
		no.ClusterName = e.ClusterName
	}
	if e.RouteUser != "" {
		pw, err := valueOrFile(e.RoutePassword, e.RoutePasswordFile, "cluster.embedded.route_password_file")
		if err != nil {
			return err
		}
		no.RouteUser, no.RoutePassword = e.RouteUser, []byte(pw)
	}
	if e.TLSCert != "" {
		no.RouteTLS = &fleet.TLSOptions{CertFile: e.TLSCert, KeyFile: e.TLSKey, CAFile: e.TLSCA}
	}
	b.node, err = fleet.StartNode(no)
	if errors.Is(err, fleet.ErrConfig) {
		return &ConfigError{Key: "cluster.embedded", Err: err}
	}
	if err != nil {
		return err
	}
	b.log.Info("embedded NATS node", "name", no.Name, "client_url", b.node.ClientURL(), "route_url", b.node.RouteURL(), "store_dir", e.StoreDir)
	return nil
}

// splitListen splits host:port; port 0 is an ephemeral port.
func splitListen(a string) (string, int, error) {
	host, p, err := net.SplitHostPort(a)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil {
		return "", 0, err
	}
	return host, port, nil
}

// leaveFleet closes the link (its queued directory writes go out first),
// the fleet connection and the embedded node, in that order. Call it after
// the MQTT server has stopped.
func (b *Broker) leaveFleet() error {
	var errs []error
	if b.link != nil {
		errs = append(errs, b.link.Close())
	}
	if b.fleet != nil {
		errs = append(errs, b.fleet.Close())
	}
	if b.node != nil {
		b.node.Shutdown()
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("fleet: %w", err)
	}
	return nil
}

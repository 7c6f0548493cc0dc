// Package broker is the runnable m2mguard broker: a mochi-mqtt server with
// the M2M1 hook, the key service on the embedded store or Vault, the MQTT
// listeners (TCP, TLS, WebSocket) and the admin HTTP API (package
// broker/admin), configured by one YAML file, environment variables and
// flags (see Config, Resolve and Reference).
//
//	cfg, err := broker.Resolve(flags, os.LookupEnv) // errors name the key
//	err = broker.Run(ctx, cfg, logger)              // until ctx is cancelled
package broker

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/m2mguard/m2mguard/broker/admin"
	"github.com/m2mguard/m2mguard/campaign"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/fleetlink"
	"github.com/m2mguard/m2mguard/fleetroute"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/mochifix"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
	"github.com/m2mguard/m2mguard/lastseen"
	"github.com/m2mguard/m2mguard/netguard"
	"github.com/m2mguard/m2mguard/replay"
	"github.com/m2mguard/m2mguard/sessionstore"
	"github.com/m2mguard/m2mguard/sms"
	"github.com/m2mguard/m2mguard/sms/smsmetrics"
	"github.com/m2mguard/m2mguard/wslistener"
)

// Broker is a started broker. Stop it with Close.
type Broker struct {
	cfg      *Config
	log      *slog.Logger
	store    keysvc.Store
	svc      *keysvc.Service
	hook     *hook.Hook
	sessions *sessionstore.Hook // nil with mqtt.persistence off
	replay   *replay.Guard
	lastSeen *lastseen.Table
	server   *mqtt.Server
	registry *prometheus.Registry

	// fleet mode (cluster.*): the embedded NATS node, the fleet, the link
	node  *fleet.Node
	fleet *fleet.Fleet
	link  *fleetlink.Link
	// downlinks routes the applications' downlinks through the fleet
	downlinks *fleetroute.Downlinks
	// uplinks routes the uplinks of this broker's clients to the other
	// brokers' applications and theirs to this broker's
	uplinks *fleetroute.Uplinks

	events    *events.Queue    // presence and security events for applications
	webhook   *events.Webhook  // nil without events.webhook_url
	campaigns *campaign.Runner // fleet-wide credential changes

	guard       *netguard.Guard // every MQTT listener's connections
	listenerIDs []string
	tracked     []*mochifix.Listener // the TCP and TLS listeners, for Close
	addrs       map[string]string    // listener id -> bound address

	adminSrv  *http.Server
	adminDone chan struct{} // closed when the admin server's Serve returns
	adminLn   net.Listener

	closeOnce sync.Once
	closeErr  error
}

// NewLogger returns the logger cfg.Log asks for, writing to w.
func NewLogger(cfg LogConfig, w io.Writer) *slog.Logger {
	level, err := parseLevel(cfg.Level)
	if err != nil {
		level = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	err := l.UnmarshalText([]byte(s))
	return l, err
}

// Run starts the broker and serves until ctx is cancelled, then shuts down
// cleanly: the admin API stops accepting, every MQTT client is disconnected,
// the store is closed.
func Run(ctx context.Context, cfg *Config, logger *slog.Logger) error {
	b, err := Start(ctx, cfg, logger)
	if err != nil {
		return err
	}
	<-ctx.Done()
	logger.Info("shutting down")
	if err := b.Close(); err != nil {
		return err
	}
	logger.Info("stopped")
	return nil
}

// Start starts the broker and returns once every listener is bound. It
// completes cfg first (Derive: the caller sees the files it will use) and
// checks it (Validate).
func Start(ctx context.Context, cfg *Config, logger *slog.Logger) (_ *Broker, err error) {
	if logger == nil {
		logger = slog.Default()
	}
	cfg.Derive()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	b := &Broker{cfg: cfg, log: logger, addrs: map[string]string{}}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	// One registry for every metric; the store's (Vault) register first.
	b.registry = prometheus.NewRegistry()
	b.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if err := b.openStore(ctx); err != nil {
		return nil, err
	}
	if cfg.Cluster.Enabled() {
		if err := b.joinFleet(ctx); err != nil {
			return nil, err
		}
	}
	sopts := serviceOptions(cfg)
	sopts.Store, sopts.SessionKeys = b.store, b.sessionKeys()
	if b.link != nil {
		sopts.OnWrite = b.link.OnWrite // the other brokers drop the record from their caches
	}
	b.svc, err = keysvc.New(sopts)
	if err != nil {
		return nil, err
	}
	b.registerCacheMetrics()

	// The terminals' last logins, kept in memory and written to data_dir
	// every few seconds (a kill -9 loses the last interval). (data_dir may
	// not exist yet: in fleet mode no replay file creates it.)
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, &ConfigError{Key: "data_dir", Err: err}
	}
	b.lastSeen, err = lastseen.Open(filepath.Join(cfg.DataDir, LastSeenFile), lastseen.Options{Logger: logger.With("component", "lastseen")})
	if err != nil {
		return nil, &ConfigError{Key: "data_dir", Err: err}
	}
	b.registerLastSeenMetrics()

	b.server = mqtt.New(MochiOptions(cfg, logger))
	if err := b.openSessions(); err != nil {
		return nil, err
	}
	hopts := hookOptions(cfg)
	hopts.Registry, hopts.Server = b.svc, b.server
	hopts.Registerer = b.registry
	hopts.LastSeen = b.lastSeen
	hopts.Logger = logger.With("component", "hook")
	if b.fleet != nil {
		// The fleet's state: claims once per fleet, failures counted
		// fleet-wide, the session directory, the change book.
		hopts.ReplayGuard = b.fleet
		hopts.Throttler = b.fleet.Throttler(hook.NewThrottleTable(hopts.Throttle))
		hopts.Directory, hopts.ChangeBook = b.link.Directory(), b.link.ChangeBook()
		hopts.ClaimTimeout = cfg.Cluster.ClaimTimeout + time.Second // the fleet's retries, and a margin
		// Downlinks reach the terminal's broker through the fleet's
		// stream, and wait there while it is offline: the hook says when
		// a terminal's session is ready for them (it exists below).
		// Uplinks go through streams of their own; their hook is added
		// below, after the session store's. Both create their streams
		// at once.
		if err := b.routeFleet(ctx, logger.With("component", "fleet")); err != nil {
			return nil, err
		}
		hopts.OnDownlinkReady, hopts.OnDownlinksDiscarded = b.downlinks.Wake, b.downlinks.Requeue
	} else {
		// The nonces of accepted logins and control messages outlive a
		// restart, whatever the store (SPEC section 3, step 6).
		b.replay, err = replay.Open(filepath.Join(cfg.DataDir, "replay"), replay.Options{Logger: logger.With("component", "replay")})
		if err != nil {
			return nil, &ConfigError{Key: "data_dir", Err: err}
		}
		hopts.ReplayGuard = b.replay
	}
	// The SMS metrics exist (at 0) without a gateway too: dashboards and
	// alerts need not know whether one is configured.
	smsMetrics, err := smsmetrics.New(b.registry)
	if err != nil {
		return nil, err
	}
	if cfg.SMS.URL != "" {
		hopts.SMS = &sms.HTTPSender{URL: cfg.SMS.URL, AuthHeader: cfg.SMS.AuthHeader, AuthValue: cfg.SMS.AuthValue,
			Retries: cfg.SMS.Retries, Timeout: cfg.SMS.Timeout, Backoff: cfg.SMS.Backoff, MaxBackoff: cfg.SMS.MaxBackoff,
			MaxRetryAfter: cfg.SMS.MaxRetryAfter, Observer: smsMetrics, Logger: logger.With("component", "sms")}
	}
	// Events for applications: published through mochi's inline client
	// and, if configured, POSTed to a webhook; the campaign runner follows
	// the change events. The runner starts changes through the hook, which
	// exists only below: it is called through b.hook once started.
	copts := campaignOptions(cfg, b.svc, campaign.StarterFunc(func(ctx context.Context, sn string, what codec.What) (*keysvc.Change, error) {
		if b.link != nil { // on the broker holding the terminal's session
			return b.link.Sessions().StartChangeBy(ctx, sn, what, "campaign")
		}
		return b.hook.StartChangeBy(ctx, sn, what, "campaign") // its change_started events say who started them
	}), logger.With("component", "campaign"))
	if b.link != nil {
		// One broker of the fleet at a time walks the campaigns.
		if copts.Lease, err = b.link.CampaignLease(); err != nil {
			return nil, fmt.Errorf("fleet: %w", err)
		}
		// A campaign created through another broker is found by the
		// holder's periodic check of the store: every 10 s, not a minute.
		copts.CheckEvery = fleetCampaignCheck
	}
	b.campaigns, err = campaign.New(copts)
	if err != nil {
		return nil, err
	}
	if err := b.startEvents(); err != nil {
		return nil, err
	}
	hopts.Events = events.Multi{b.events, b.campaigns}
	if b.sessions != nil {
		hopts.Storage = b.sessions
	}
	b.hook, err = hook.New(hopts)
	if err != nil {
		return nil, err
	}
	// The M2M1 hook is the only auth/ACL hook: mochi ORs their answers.
	if err := b.server.AddHook(b.hook, nil); err != nil {
		return nil, err
	}
	// The fleet's downlink routing after it (the hook's ACL has refused
	// what an application may not publish) and before the session store,
	// which then never journals a downlink this broker does not deliver.
	if b.downlinks != nil {
		if err := b.server.AddHook(b.downlinks, nil); err != nil {
			return nil, err
		}
	}
	// The session store after them: it must see uplinks as the hook opened
	// them and never a packet the hook dropped. Serve restores the sessions.
	if b.sessions != nil {
		if err := b.server.AddHook(b.sessions, nil); err != nil {
			return nil, err
		}
	}
	if b.link != nil {
		if err := b.link.Attach(b.hook, b.svc); err != nil {
			return nil, fmt.Errorf("fleet: %w", err)
		}
	}
	// Uplinks fleet-wide, after both: it forwards what the hook opened and
	// let through, never a packet the hook dropped.
	if b.uplinks != nil {
		if err := b.server.AddHook(b.uplinks, nil); err != nil {
			return nil, err
		}
	}
	if err := b.addListeners(); err != nil {
		return nil, err
	}
	if err := b.server.Serve(); err != nil {
		return nil, err
	}
	if b.downlinks != nil {
		if err := b.downlinks.Start(); err != nil {
			return nil, fmt.Errorf("fleet: %w", err)
		}
	}
	if b.link != nil && b.sessions != nil {
		// Sessions restored from the store whose client logged in on
		// another broker while this one was down live there now.
		b.link.DiscardMoved(ctx, offlineClients(b.server))
	}
	if b.uplinks != nil {
		// The fleet's retained uplinks over those the session store
		// restored, then the other brokers' uplinks.
		if err := b.uplinks.Start(ctx); err != nil {
			return nil, fmt.Errorf("fleet: %w", err)
		}
	}
	b.campaigns.Start()
	if err := b.startAdmin(); err != nil {
		return nil, err
	}
	if b.fleet != nil {
		logger.Info("broker started", "store", cfg.Store.Type, "public_url", b.PublicURL(), "fleet", true, "broker_id", cfg.Cluster.BrokerID)
	} else {
		logger.Info("broker started", "store", cfg.Store.Type, "public_url", b.PublicURL())
	}
	return b, nil
}

// LastSeenFile is the file in data_dir of the terminals' last logins.
const LastSeenFile = "lastseen.db"

// serviceOptions are the key service's options that cfg sets (Store and
// SessionKeys are the caller's).
func serviceOptions(cfg *Config) keysvc.Options {
	return keysvc.Options{
		ChangeDeadline:   cfg.Keys.ChangeDeadline,
		PasswordLifetime: cfg.Keys.PasswordLifetime,
		KeyLifetime:      cfg.Keys.KeyLifetime,
		Cache:            keysvc.CacheOptions{MaxEntries: cfg.Cache.MaxEntries, TTL: cfg.Cache.TTL, MaxStale: cfg.Cache.MaxStale},
	}
}

// hookOptions are the hook's options that cfg sets (the registry, server,
// replay guard, SMS sender, logger and registerer are the caller's).
func hookOptions(cfg *Config) hook.Options {
	a := cfg.Auth
	return hook.Options{
		Skew: a.Skew, Grace: a.Grace, SessionLifetime: a.SessionLifetime,
		StoreTimeout: a.StoreTimeout, SMSOnRequest: cfg.SMS.OnRequest, RefusalEventRate: cfg.Events.RefusalRate,
		Throttle: hook.ThrottleOptions{Free: a.ThrottleFree, Base: a.ThrottleBase, Max: a.ThrottleMax, MaxEntries: a.ThrottleMaxEntries},
		Apps: hook.AppLimitOptions{
			Concurrency: a.AppConcurrency, ConcurrencyPerAddr: a.AppConcurrencyPerAddr,
			Rate: a.AppRate, RatePerAddr: a.AppRatePerAddr,
			FailuresPerAddr: a.AppFailuresPerAddr, FailureRefill: a.AppFailureRefill,
		},
	}
}

// fleetCampaignCheck is how often, in fleet mode, the holder of the
// campaigns' lease looks for campaigns created through other brokers (and
// for changes past their deadline).
const fleetCampaignCheck = 10 * time.Second

// campaignOptions are the campaign runner's options that cfg sets.
func campaignOptions(cfg *Config, keys campaign.Keys, starter campaign.Starter, logger *slog.Logger) campaign.Options {
	return campaign.Options{Keys: keys, Starter: starter, MaxRate: cfg.Campaigns.MaxRate, Logger: logger}
}

// startEvents starts the queue of events for applications, its webhook if
// one is configured, and exports their counters.
func (b *Broker) startEvents() error {
	cfg := b.cfg.Events
	var handlers []func(events.Event)
	if cfg.MQTT {
		handlers = append(handlers, events.MQTTPublisher(b.server.Publish))
	}
	if cfg.WebhookURL != "" {
		b.webhook = &events.Webhook{URL: cfg.WebhookURL, AuthHeader: cfg.WebhookAuthHeader, AuthValue: cfg.WebhookAuthValue,
			Batch: cfg.WebhookBatch, Retries: cfg.WebhookRetries, Timeout: cfg.WebhookTimeout,
			Queue: cfg.Queue, Logger: b.log.With("component", "events")}
		if cfg.WebhookRetries == 0 {
			b.webhook.Retries = -1 // none: the zero Webhook would take its default
		}
		if err := b.webhook.Start(); err != nil {
			return &ConfigError{Key: "events.webhook_url", Err: err}
		}
		handlers = append(handlers, b.webhook.Emit)
	}
	b.events = events.NewQueue(events.QueueOptions{Size: cfg.Queue}, handlers...)
	q, w := b.events, b.webhook
	dropped := func(sink string, f func() uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_events_dropped_total",
			Help:        "Events for applications dropped because a queue was full: queue (before MQTT and the webhook), webhook (its own queue).",
			ConstLabels: prometheus.Labels{"queue": sink}}, func() float64 { return float64(f()) })
	}
	webhookStats := func(f func(events.WebhookStats) uint64) func() uint64 {
		return func() uint64 {
			if w == nil {
				return 0
			}
			return f(w.Stats())
		}
	}
	webhookEvents := func(result string, f func(events.WebhookStats) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_webhook_events_total",
			Help:        "Events POSTed to the webhook by result: sent (answered 2xx) or failed (retries used up, or refused with 4xx: dropped).",
			ConstLabels: prometheus.Labels{"result": result}}, func() float64 { return float64(webhookStats(f)()) })
	}
	b.registry.MustRegister(
		dropped("queue", func() uint64 { return q.Stats().Dropped }),
		dropped("webhook", webhookStats(func(s events.WebhookStats) uint64 { return s.Dropped })),
		webhookEvents("sent", func(s events.WebhookStats) uint64 { return s.Sent }),
		webhookEvents("failed", func(s events.WebhookStats) uint64 { return s.Failed }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_webhook_retries_total",
			Help: "Webhook POST attempts retried."}, func() float64 {
			return float64(webhookStats(func(s events.WebhookStats) uint64 { return s.Retries })())
		}),
		b.campaigns,
	)
	return nil
}

// guardOptions are the connection guard's options that cfg sets (the
// callbacks are the caller's).
func guardOptions(cfg *Config) netguard.Options {
	m := cfg.MQTT
	return netguard.Options{ConnectTimeout: m.ConnectTimeout, WriteTimeout: m.WriteTimeout, MaxPerAddr: m.MaxConnsPerAddr, MaxConns: m.MaxConns,
		TrustedProxies: m.ProxyProtocolTrusted}
}

// MochiOptions are the mochi server options of cfg: the inline client on
// (the hook publishes key messages through it), the per-client buffers and
// outbound queue tuned down from mochi's defaults (about 89 KiB per idle
// client) and mochi's log filtered (mochiLogHandler): no packet is ever
// logged, and the ends of connections that the hook already logged, or
// that are routine, are debug lines.
func MochiOptions(cfg *Config, logger *slog.Logger) *mqtt.Options {
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumClientWritesPending = int32(cfg.MQTT.MaxWritesPending)
	caps.MaximumPacketSize = uint32(cfg.MQTT.MaxPacketSize)
	caps.MaximumSessionExpiryInterval = uint32(min(cfg.MQTT.SessionExpiry/time.Second, math.MaxUint32))
	// A queued message lives as long as the session that holds it (mochi
	// drops it after 24 hours by default, however long the session is
	// kept); retained messages keep at least mochi's 24 hours.
	caps.MaximumMessageExpiryInterval = max(caps.MaximumMessageExpiryInterval, int64(caps.MaximumSessionExpiryInterval))
	return &mqtt.Options{
		InlineClient:             true,
		Capabilities:             caps,
		ClientNetReadBufferSize:  cfg.MQTT.ReadBuffer,
		ClientNetWriteBufferSize: cfg.MQTT.WriteBuffer,
		Logger:                   slog.New(mochiLogHandler{logger.With("component", "mqtt").Handler()}),
	}
}

func (b *Broker) openStore(ctx context.Context) error {
	cfg := b.cfg
	switch cfg.Store.Type {
	case "vault":
		v := cfg.Store.Vault
		metrics, err := vaultstore.NewMetrics(b.registry)
		if err != nil {
			return err
		}
		opts := vaultstore.Options{Address: v.Address, Mount: v.Mount, Prefix: v.Prefix, Timeout: v.Timeout, CACert: v.CACert,
			MaxConns: v.MaxConns, Logger: b.log.With("component", "vault"), Metrics: metrics}
		auth := vaultstore.MethodToken
		switch {
		case v.UsesKubernetes():
			auth = vaultstore.MethodKubernetes
			opts.Kubernetes = &vaultstore.Kubernetes{MountPath: v.KubernetesMount, Role: v.KubernetesRole, TokenFile: v.KubernetesTokenFile}
		case v.UsesAppRole():
			auth = vaultstore.MethodAppRole
			if opts.AppRole, err = appRole(v); err != nil {
				return err
			}
		default:
			token, err := valueOrFile(v.Token, v.TokenFile, "store.vault.token_file")
			if err != nil {
				return err
			}
			opts.Token = token
		}
		s, err := vaultstore.Open(ctx, opts)
		if opts.AppRole != nil {
			clear(opts.AppRole.SecretID)
			clear(opts.AppRole.WrappingToken)
		}
		if errors.Is(err, vaultstore.ErrWrappingToken) && opts.AppRole != nil {
			src := "store.vault.approle.wrapping_token"
			if v.AppRoleWrappingTokenFile != "" {
				src = v.AppRoleWrappingTokenFile + " (store.vault.approle.wrapping_token_file)"
			}
			return fmt.Errorf("vault store at %s: %w; put a fresh wrapping token into %s", v.Address, err, src)
		}
		if err != nil {
			return fmt.Errorf("vault store at %s: %w", v.Address, err)
		}
		b.store = s
		b.log.Info("vault store", "address", v.Address, "mount", v.Mount, "prefix", v.Prefix, "auth", auth, "transit", v.Transit)
	default:
		e := cfg.Store.Embedded
		key, keySrc, err := b.masterKey()
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(e.File), 0o700); err != nil {
			return &ConfigError{Key: "store.embedded.file", Err: err}
		}
		s, err := boltstore.Open(e.File, boltstore.Options{MasterKey: key, Reseal: e.Reseal, Logger: b.log.With("component", "store")})
		clear(key)
		if err != nil {
			var te *boltstore.TamperError
			if f, ok := fieldByKey("store.embedded.reseal"); ok && errors.As(err, &te) {
				return fmt.Errorf("embedded store %s: %w; start once with %s=%s (flag --%s, env %s), then remove the setting",
					e.File, err, f.Key, te.ResealCode, f.Flag(), f.Env())
			}
			return fmt.Errorf("embedded store %s: %w", e.File, err)
		}
		b.store = s
		b.log.Info("embedded store", "file", e.File, "master_key", keySrc)
	}
	return nil
}

// masterKey loads the master key (store.embedded.master_key_file, created
// on first run, or $M2MGUARD_MASTER_KEY) and says where it came from.
func (b *Broker) masterKey() (key []byte, source string, err error) {
	file := b.cfg.Store.Embedded.MasterKeyFile
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return nil, "", &ConfigError{Key: "store.embedded.master_key_file", Err: err}
	}
	_, fromEnv := os.LookupEnv(boltstore.EnvMasterKey)
	key, err = boltstore.LoadOrCreateMasterKey("", file)
	if err != nil {
		if fromEnv {
			return nil, "", &ConfigError{Key: "store.embedded.master_key_file", Source: "env " + boltstore.EnvMasterKey, Err: err}
		}
		return nil, "", &ConfigError{Key: "store.embedded.master_key_file", Err: err}
	}
	if fromEnv {
		return key, "$" + boltstore.EnvMasterKey, nil
	}
	return key, file, nil
}

// openSessions opens the session store (mqtt.persistence), sealed under
// the master key whatever the store type: with Vault too, the key file
// (or $M2MGUARD_MASTER_KEY) is the broker's.
func (b *Broker) openSessions() error {
	m := b.cfg.MQTT
	if m.Persistence == "off" {
		b.log.Info("session store off (mqtt.persistence): a restart forgets every session, queued and retained message")
		return nil
	}
	key, keySrc, err := b.masterKey()
	if err != nil {
		return err
	}
	defer clear(key)
	if err := os.MkdirAll(filepath.Dir(m.PersistenceFile), 0o700); err != nil {
		return &ConfigError{Key: "mqtt.persistence_file", Err: err}
	}
	b.sessions, err = sessionstore.Open(m.PersistenceFile, sessionstore.Options{
		MasterKey: key, Server: b.server, SyncCommits: m.Persistence == "sync",
		// A restored session the store expires leaves the hook too, as
		// one mochi expires does (hook.OnClientExpired).
		OnExpire: func(cl *mqtt.Client) { b.hook.OnClientExpired(cl) },
		Logger:   b.log.With("component", "sessions"),
	})
	if errors.Is(err, sessionstore.ErrWrongKey) {
		return &ConfigError{Key: "mqtt.persistence_file", Err: fmt.Errorf("%s: %w (the master key is %s)", m.PersistenceFile, err, keySrc)}
	}
	if err != nil {
		return err
	}
	b.log.Info("session store", "file", m.PersistenceFile, "durability", m.Persistence, "master_key", keySrc)
	s := b.sessions
	b.registry.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_sessionstore_writes_total",
			Help: "Changes written to the session store (mqtt.persistence)."},
			func() float64 { return float64(s.Stats().Writes) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_sessionstore_commits_total",
			Help: "Session store transactions; concurrent changes share one."},
			func() float64 { return float64(s.Stats().Commits) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_sessionstore_write_errors_total",
			Help: "Session store writes that failed: the change is kept in memory only, a restart loses it."},
			func() float64 { return float64(s.Stats().WriteErrors) }),
	)
	return nil
}

func (b *Broker) sessionKeys() keysvc.SessionKeySource {
	v := b.cfg.Store.Vault
	if b.cfg.Store.Type != "vault" || !v.Transit {
		return nil
	}
	return &vaultstore.TransitKeys{Store: b.store.(*vaultstore.Store), Mount: v.TransitMount, Key: v.TransitKey}
}

// appRole reads the AppRole credentials of v: the role_id, and the
// secret_id or a wrapping token of it.
func appRole(v VaultConfig) (*vaultstore.AppRole, error) {
	roleID, err := valueOrFile(v.AppRoleRoleID, v.AppRoleRoleIDFile, "store.vault.approle.role_id_file")
	if err != nil {
		return nil, err
	}
	ar := &vaultstore.AppRole{MountPath: v.AppRoleMount, RoleID: roleID}
	if v.AppRoleWrappingToken != "" || v.AppRoleWrappingTokenFile != "" {
		wt, err := valueOrFile(v.AppRoleWrappingToken, v.AppRoleWrappingTokenFile, "store.vault.approle.wrapping_token_file")
		if err != nil {
			return nil, err
		}
		ar.WrappingToken = []byte(wt)
		return ar, nil
	}
	secretID, err := valueOrFile(v.AppRoleSecretID, v.AppRoleSecretIDFile, "store.vault.approle.secret_id_file")
	if err != nil {
		return nil, err
	}
	ar.SecretID = []byte(secretID)
	return ar, nil
}

// valueOrFile returns v, or the trimmed content of file.
func valueOrFile(v, file, key string) (string, error) {
	if v != "" || file == "" {
		return v, nil
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return "", &ConfigError{Key: key, Err: err}
	}
	s := strings.TrimSpace(string(data))
	if s == "" {
		return "", &ConfigError{Key: key, Err: errors.New("file is empty")}
	}
	return s, nil
}

// addListeners binds every configured MQTT listener now (a taken port is a
// start-up error; port 0 works and Addr tells the port) and adds it to
// mochi, each wrapped by the one netguard.Guard, so that the CONNECT
// deadline, the write timeout and the connection limits hold for TCP, TLS
// and WebSocket alike and the limits count them together.
func (b *Broker) addListeners() error {
	cfg := b.cfg.MQTT
	var tlsConf *tls.Config
	if cfg.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			return &ConfigError{Key: "mqtt.tls_cert", Err: err}
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	netlog := b.log.With("component", "netguard")
	gopts := guardOptions(b.cfg)
	gopts.OnRefuse = func(addr, reason string) {
		netlog.Debug("connection refused", "remote", addr, "reason", reason)
	}
	gopts.OnWriteTimeout = func(addr string) {
		netlog.Debug("connection closed: write timed out (the client does not read)", "remote", addr)
	}
	gopts.OnAcceptError = acceptErrorLogger(netlog, acceptWarnEvery, time.Now)
	b.guard = netguard.New(gopts)
	b.registerGuardMetrics()
	add := func(id, key, address string, listener func(net.Listener) listeners.Listener) error {
		ln, err := net.Listen("tcp", address)
		if err != nil {
			return &ConfigError{Key: key, Err: err}
		}
		// Tracked, so that Close waits for what it accepted to reach mochi.
		tracked := mochifix.Track(b.guard.Wrap(ln))
		if err := b.server.AddListener(listener(tracked)); err != nil {
			ln.Close()
			return fmt.Errorf("listener %s: %w", id, err)
		}
		b.addrs[id] = ln.Addr().String()
		b.listenerIDs = append(b.listenerIDs, id)
		b.tracked = append(b.tracked, tracked)
		return nil
	}
	if cfg.TCP != "" {
		if err := add("tcp", "mqtt.tcp", cfg.TCP, func(ln net.Listener) listeners.Listener {
			return listeners.NewNet("tcp", ln)
		}); err != nil {
			return err
		}
	}
	if cfg.TLS != "" && tlsConf != nil {
		if err := add("tls", "mqtt.tls", cfg.TLS, func(ln net.Listener) listeners.Listener {
			return listeners.NewNet("tls", tls.NewListener(ln, tlsConf))
		}); err != nil {
			return err
		}
	}
	if cfg.WS != "" {
		if err := add("ws", "mqtt.ws", cfg.WS, func(ln net.Listener) listeners.Listener {
			return wslistener.New("ws", ln, wslistener.Options{TLSConfig: tlsConf, ConnectTimeout: cfg.ConnectTimeout})
		}); err != nil {
			return err
		}
	}
	for _, id := range b.listenerIDs {
		b.log.Info("mqtt listener", "id", id, "address", b.addrs[id])
	}
	if len(cfg.ProxyProtocolTrusted) > 0 {
		b.log.Info("proxy protocol: connections from these networks must start with a PROXY header", "trusted", fmt.Sprint(cfg.ProxyProtocolTrusted))
	}
	return nil
}

// registerCacheMetrics exports the key service cache's lookups by result
// (a stale or fail-closed lookup means the store did not answer) and the
// throttle table's bound, beside the hook's m2mguard_throttle_entries.
func (b *Broker) registerCacheMetrics() {
	svc, maxEntries := b.svc, b.cfg.Auth.ThrottleMaxEntries
	lookups := func(result string, of func(keysvc.CacheStats) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_cache_lookups_total",
			Help:        "Terminal lookups of the key service by result: hit (fresh from the cache), miss (asked the store), stale (the store failed; served from the cache within cache.max_stale), fail_closed (the store failed and nothing usable was cached: refused).",
			ConstLabels: prometheus.Labels{"result": result}},
			func() float64 { return float64(of(svc.CacheStats())) })
	}
	b.registry.MustRegister(
		lookups("hit", func(s keysvc.CacheStats) uint64 { return s.Hits }),
		lookups("miss", func(s keysvc.CacheStats) uint64 { return s.Misses }),
		lookups("stale", func(s keysvc.CacheStats) uint64 { return s.Stale }),
		lookups("fail_closed", func(s keysvc.CacheStats) uint64 { return s.FailClosed }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "m2mguard_throttle_max_entries",
			Help: "Bound of the login throttle table (auth.throttle_max_entries); compare m2mguard_throttle_entries."},
			func() float64 { return float64(maxEntries) }),
	)
}

// registerLastSeenMetrics exports the last-seen table's counters.
func (b *Broker) registerLastSeenMetrics() {
	ls := b.lastSeen
	flushes := func(result string, of func(lastseen.Stats) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_last_seen_flushes_total",
			Help:        "Batches of changed last logins written to data_dir/lastseen.db, by result (a failed batch is written with the next).",
			ConstLabels: prometheus.Labels{"result": result}},
			func() float64 { return float64(of(ls.Stats())) })
	}
	b.registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "m2mguard_last_seen_terminals",
			Help: "Terminals with a last login on record."},
			func() float64 { return float64(ls.Stats().Entries) }),
		flushes("ok", func(s lastseen.Stats) uint64 { return s.Flushes - s.FlushFailures }),
		flushes("failed", func(s lastseen.Stats) uint64 { return s.FlushFailures }),
	)
}

// acceptWarnEvery is the most often a warning about accept errors is
// logged: out of descriptors, the guard retries up to once a second per
// listener (m2mguard_accept_errors_total counts every error).
const acceptWarnEvery = 10 * time.Second

// acceptErrorLogger returns the guard's OnAcceptError: a warning at most
// every interval (by the clock now), saying how many errors it stands for.
func acceptErrorLogger(log *slog.Logger, every time.Duration, now func() time.Time) func(error, time.Duration) {
	var mu sync.Mutex
	var last time.Time
	var since int // errors not logged yet
	return func(err error, delay time.Duration) {
		mu.Lock()
		since++
		t := now()
		if !last.IsZero() && t.Sub(last) < every {
			mu.Unlock()
			return
		}
		n := since
		last, since = t, 0
		mu.Unlock()
		log.Warn("accepting MQTT connections failed; retrying (out of file descriptors? raise the open-file limit, ulimit -n)",
			"err", err, "retry_in", delay, "errors", n)
	}
}

// registerGuardMetrics exports the guard's counters on the registry.
func (b *Broker) registerGuardMetrics() {
	g := b.guard
	b.registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "m2mguard_connections_open",
			Help: "Open MQTT connections, all listeners together."},
			func() float64 { return float64(g.Stats().Open) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_connections_refused_total",
			Help: "MQTT connections closed at once by a connection limit, by limit.", ConstLabels: prometheus.Labels{"limit": netguard.ReasonPerAddr}},
			func() float64 { return float64(g.Stats().RefusedPerAddr) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_connections_refused_total",
			Help: "MQTT connections closed at once by a connection limit, by limit.", ConstLabels: prometheus.Labels{"limit": netguard.ReasonTotal}},
			func() float64 { return float64(g.Stats().RefusedTotal) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_accept_errors_total",
			Help: "Temporary errors accepting MQTT connections (the process or system out of file descriptors or memory), each retried after a pause."},
			func() float64 { return float64(g.Stats().AcceptErrors) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_write_timeouts_total",
			Help: "MQTT connections closed because a write to the client did not finish within mqtt.write_timeout."},
			func() float64 { return float64(g.Stats().WriteTimeouts) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_connections_proxied_total",
			Help: "MQTT connections whose client address a trusted proxy's PROXY header named (mqtt.proxy_protocol_trusted)."},
			func() float64 { return float64(g.Stats().Proxied) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_proxy_local_connections_total",
			Help: "Trusted proxies' own connections (PROXY header with the LOCAL command: their health checks)."},
			func() float64 { return float64(g.Stats().ProxyLocal) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_proxy_headers_refused_total",
			Help: "MQTT connections refused for their PROXY header: from an untrusted address, or from a trusted proxy without a valid one.", ConstLabels: prometheus.Labels{"reason": "untrusted"}},
			func() float64 { return float64(g.Stats().RefusedProxyUntrusted) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "m2mguard_proxy_headers_refused_total",
			Help: "MQTT connections refused for their PROXY header: from an untrusted address, or from a trusted proxy without a valid one.", ConstLabels: prometheus.Labels{"reason": "invalid"}},
			func() float64 { return float64(g.Stats().RefusedProxyInvalid) }),
	)
}

func (b *Broker) startAdmin() error {
	cfg := b.cfg.Admin
	if cfg.Listen == "" {
		b.log.Info("admin API disabled (admin.listen off)")
		return nil
	}
	token, err := b.loadOrCreateToken(cfg.Token, cfg.TokenFile, "admin.token_file", "admin token")
	if err != nil {
		return err
	}
	metricsToken, err := b.loadOrCreateToken(cfg.MetricsToken, cfg.MetricsTokenFile, "admin.metrics_token_file", "metrics token")
	if err != nil {
		return err
	}
	ops, err := b.loadOperators(cfg.TokensFile)
	if err != nil {
		return err
	}
	var sessions admin.Sessions = b.hook
	if b.link != nil {
		sessions = b.link.Sessions() // every broker's sessions; calls reach the broker holding one
	}
	h, err := admin.New(admin.Options{
		Terminals: b.svc, Apps: b.svc, Sessions: sessions, Campaigns: b.campaigns, Token: token, Operators: ops, MetricsToken: metricsToken,
		LastSeen: b.lastSeen, Gatherer: b.registry, Registerer: b.registry, BrokerURL: b.PublicURL(), Logger: b.log.With("component", "admin"),
	})
	if err != nil {
		return &ConfigError{Key: "admin.tokens_file", Err: err}
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return &ConfigError{Key: "admin.listen", Err: err}
	}
	b.adminLn = ln
	b.adminSrv = &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(b.log.With("component", "admin").Handler(), slog.LevelWarn)}
	b.adminDone = make(chan struct{})
	go func() {
		defer close(b.adminDone)
		if err := b.adminSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			b.log.Error("admin API stopped", "err", err)
		}
	}()
	b.log.Info("admin API", "address", ln.Addr().String())
	return nil
}

// loadOperators reads the named operators of admin.tokens_file ("" =
// none). The log names each operator and its role, never a hash.
func (b *Broker) loadOperators(file string) ([]admin.Operator, error) {
	if file == "" {
		return nil, nil
	}
	f, err := os.Open(file)
	if err != nil {
		return nil, &ConfigError{Key: "admin.tokens_file", Err: err}
	}
	defer f.Close()
	ops, err := admin.ParseOperators(f)
	if err != nil {
		return nil, &ConfigError{Key: "admin.tokens_file", Err: fmt.Errorf("%s: %w", file, err)}
	}
	if fi, err := f.Stat(); err == nil && fi.Mode().Perm()&0o022 != 0 {
		b.log.Warn("admin.tokens_file is writable by others: whoever can write it can add an operator; chmod 644 or stricter", "file", file)
	}
	for _, op := range ops {
		b.log.Info("admin operator", "name", op.Name, "role", op.Role)
	}
	return ops, nil
}

// loadOrCreateToken returns the configured token, or the token of file,
// generating it there (0600) on first run; key names the file's config key
// in errors, name the token in the log, which names the file, never the
// token.
func (b *Broker) loadOrCreateToken(value, file, key, name string) (string, error) {
	if value != "" {
		return value, nil
	}
	data, err := os.ReadFile(file)
	switch {
	case err == nil:
		tok := strings.TrimSpace(string(data))
		if len(tok) < 16 {
			return "", &ConfigError{Key: key, Err: errors.New("token shorter than 16 characters")}
		}
		if fi, err := os.Stat(file); err == nil && fi.Mode().Perm()&0o077 != 0 {
			b.log.Warn(name+" file is readable by others; chmod 600 it", "file", file)
		}
		b.log.Info(name, "file", file)
		return tok, nil
	case errors.Is(err, fs.ErrNotExist):
		raw := make([]byte, 32)
		if _, err := rand.Read(raw); err != nil {
			return "", err
		}
		tok := base64.RawURLEncoding.EncodeToString(raw)
		if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
			return "", &ConfigError{Key: key, Err: err}
		}
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return "", &ConfigError{Key: key, Err: err}
		}
		_, werr := f.WriteString(tok + "\n")
		if err := errors.Join(werr, f.Sync(), f.Close()); err != nil {
			return "", &ConfigError{Key: key, Err: err}
		}
		b.log.Info(name+" generated", "file", file)
		return tok, nil
	default:
		return "", &ConfigError{Key: key, Err: err}
	}
}

// PublicURL is the broker URL of provisioning bundles: mqtt.public_url, else
// tcp://<host>:<tcp port> with localhost for a wildcard address.
func (b *Broker) PublicURL() string {
	if b.cfg.MQTT.PublicURL != "" {
		return b.cfg.MQTT.PublicURL
	}
	scheme, a := "tcp", b.addrs["tcp"]
	if a == "" {
		scheme, a = "ssl", b.addrs["tls"]
	}
	if a == "" {
		return "ws://localhost" + portOf(b.addrs["ws"]) + "/mqtt"
	}
	host, port, _ := net.SplitHostPort(a)
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "localhost"
	}
	return scheme + "://" + net.JoinHostPort(host, port)
}

func portOf(a string) string {
	if _, p, err := net.SplitHostPort(a); err == nil {
		if _, err := strconv.Atoi(p); err == nil {
			return ":" + p
		}
	}
	return ""
}

// Addr returns the bound address of a listener: "tcp", "tls", "ws" or
// "admin" ("" if it is not enabled).
func (b *Broker) Addr(id string) string {
	if id == "admin" {
		if b.adminLn == nil {
			return ""
		}
		return b.adminLn.Addr().String()
	}
	return b.addrs[id]
}

// Registry returns the Prometheus registry the hook, the connection guard
// and the Go and process collectors are registered with (served on
// /metrics to the metrics and admin tokens).
func (b *Broker) Registry() *prometheus.Registry { return b.registry }

// Fleet returns the broker's fleet, nil unless in fleet mode.
func (b *Broker) Fleet() *fleet.Fleet { return b.fleet }

// FleetLink returns the broker's part in its fleet, nil unless in fleet
// mode.
func (b *Broker) FleetLink() *fleetlink.Link { return b.link }

// Service returns the key service.
func (b *Broker) Service() *keysvc.Service { return b.svc }

// LastSeen returns the terminals' last logins.
func (b *Broker) LastSeen() *lastseen.Table { return b.lastSeen }

// Hook returns the M2M1 hook.
func (b *Broker) Hook() *hook.Hook { return b.hook }

// Campaigns returns the runner of credential campaigns.
func (b *Broker) Campaigns() *campaign.Runner { return b.campaigns }

// Server returns the mochi server.
func (b *Broker) Server() *mqtt.Server { return b.server }

// Close stops the admin API, stops injecting the fleet's uplinks,
// disconnects every client, stops mochi (which
// records the clients' disconnects in the session store, then flushes and
// closes it), leaves the fleet (its link, its connection, its embedded NATS
// node), closes the replay guard, writes the last logins and closes the
// store. It is safe to call more than once.
func (b *Broker) Close() error {
	b.closeOnce.Do(func() {
		var errs []error
		if b.adminSrv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if err := b.adminSrv.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("admin API: %w", err))
				b.adminSrv.Close() // requests still running after 5 s are cut off
			}
			cancel()
			<-b.adminDone
		}
		if b.campaigns != nil {
			b.campaigns.Close() // writes its progress to the store, which is still open
		}
		if b.downlinks != nil { // its drains inject into mochi: they stop first
			if err := b.downlinks.Close(); err != nil {
				errs = append(errs, err)
			}
		}
		if b.uplinks != nil {
			// No other broker's uplink is injected from now on; what is
			// not acknowledged is delivered again after the restart.
			b.uplinks.Close()
		}
		if b.server != nil {
			if err := mochifix.Close(b.server, b.listenerIDs, 10*time.Second, b.tracked...); err != nil {
				errs = append(errs, fmt.Errorf("mqtt: %w", err))
			}
		}
		if b.events != nil {
			b.events.Close()
		}
		if b.webhook != nil {
			b.webhook.Close()
		}
		if b.sessions != nil { // mochi's Close has closed it when it stopped the hooks
			if err := b.sessions.Close(); err != nil {
				errs = append(errs, fmt.Errorf("session store: %w", err))
			}
		}
		if err := b.leaveFleet(); err != nil {
			errs = append(errs, err)
		}
		if b.replay != nil {
			if err := b.replay.Close(); err != nil {
				errs = append(errs, fmt.Errorf("replay guard: %w", err))
			}
		}
		if b.lastSeen != nil { // after mochi: no login records anything now
			if err := b.lastSeen.Close(); err != nil {
				errs = append(errs, fmt.Errorf("last seen: %w", err))
			}
		}
		if b.store != nil {
			if err := b.store.Close(); err != nil {
				errs = append(errs, fmt.Errorf("store: %w", err))
			}
		}
		b.closeErr = errors.Join(errs...)
	})
	return b.closeErr
}

// offlineClients returns the ClientIDs of the server's sessions without a
// connection (at start: the ones restored from the session store).
func offlineClients(s *mqtt.Server) []string {
	var ids []string
	for id, cl := range s.Clients.GetAll() {
		if cl.Closed() {
			ids = append(ids, id)
		}
	}
	return ids
}

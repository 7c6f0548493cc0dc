package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/mochifix"
	"github.com/m2mguard/m2mguard/internal/stats"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
	"github.com/m2mguard/m2mguard/lastseen"
	"github.com/m2mguard/m2mguard/replay"
)

// BrokerConfig describes a benchmark broker. The mochi options (write
// queue and buffer sizes) are the same whatever the mode, so that the
// baseline and the hook are compared on equal terms.
type BrokerConfig struct {
	Mode   string // "allow": mochi with auth.AllowHook only; "hook": mochi with the m2mguard hook only
	Store  string // hook mode: "bolt" or "vault"
	Listen string // host:port; "" = 127.0.0.1:0

	BoltPath   string // bolt store file
	MasterKey  []byte // bolt master key
	VaultAddr  string
	VaultToken string
	VaultPfx   string // KV prefix; "" = "m2mguard"

	ReplayDir string // hook mode: the replay guard's directory (replay.Open, as the broker runs it); "" = in memory

	CacheTTL time.Duration // keysvc read cache TTL; 0 = keysvc's default (30 s)
	// StoreTimeout bounds one key-service call of a login (the broker's
	// auth.store_timeout); 0 = the hook's default.
	StoreTimeout time.Duration
	Prewarm      bool // look every terminal up once before listening (a warm cache)

	// ThrottlePeriod, if set, is the login throttle's first and longest
	// refusal period (hook.ThrottleOptions Base and Max); 0 = the hook's
	// defaults. Only its length changes: a throttled login's check is the
	// same table lookup whatever the period.
	ThrottlePeriod time.Duration

	WritesPending int // mochi Capabilities.MaximumClientWritesPending
	NetBuf        int // mochi ClientNetReadBufferSize and ClientNetWriteBufferSize

	// Fleet mode (hook mode): the NATS servers of the fleet (`m2m-bench
	// nats`), empty = a single broker; the password of its user; this
	// broker's id in the fleet.
	NATSURLs     []string
	NATSPassword string
	BrokerID     string
}

// Broker is a running benchmark broker.
type Broker struct {
	Addr   string
	Server *mqtt.Server
	Hook   *hook.Hook      // nil in allow mode
	Svc    *keysvc.Service // nil in allow mode
	store  keysvc.Store
	replay *replay.Guard        // nil unless BrokerConfig.ReplayDir
	reg    *prometheus.Registry // the hook's metrics; nil in allow mode
	fleet  *benchFleet          // nil unless BrokerConfig.NATSURLs
}

// mochiOptions returns the mochi options every benchmark broker runs with.
func mochiOptions(cfg BrokerConfig) *mqtt.Options {
	caps := mqtt.NewDefaultServerCapabilities()
	if cfg.WritesPending > 0 {
		caps.MaximumClientWritesPending = int32(cfg.WritesPending)
	}
	return &mqtt.Options{
		InlineClient:             true,
		Capabilities:             caps,
		ClientNetReadBufferSize:  cfg.NetBuf,
		ClientNetWriteBufferSize: cfg.NetBuf,
		Logger:                   slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
}

// openStore opens the key store of cfg.
func openStore(ctx context.Context, cfg BrokerConfig) (keysvc.Store, error) {
	switch cfg.Store {
	case "bolt":
		return boltstore.Open(cfg.BoltPath, boltstore.Options{MasterKey: cfg.MasterKey, NoSync: true})
	case "vault":
		return vaultstore.Open(ctx, vaultstore.Options{Address: cfg.VaultAddr, Token: cfg.VaultToken, Prefix: cfg.VaultPfx,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	}
	return nil, fmt.Errorf("unknown store %q (bolt or vault)", cfg.Store)
}

// StartBroker starts a broker as cfg says and returns once it listens.
func StartBroker(ctx context.Context, cfg BrokerConfig) (*Broker, error) {
	b := &Broker{Server: mqtt.New(mochiOptions(cfg))}
	switch cfg.Mode {
	case "allow":
		if err := b.Server.AddHook(new(auth.AllowHook), nil); err != nil {
			return nil, err
		}
	case "hook":
		store, err := openStore(ctx, cfg)
		if err != nil {
			return nil, err
		}
		b.store = store
		sopts := keysvc.Options{Store: store, Cache: keysvc.CacheOptions{TTL: cfg.CacheTTL, MaxEntries: 1_000_000}}
		if len(cfg.NATSURLs) > 0 {
			if b.fleet, err = openFleet(ctx, cfg); err != nil {
				store.Close()
				return nil, err
			}
			sopts.OnWrite = b.fleet.link.OnWrite
		}
		b.Svc, err = keysvc.New(sopts)
		if err != nil {
			b.closeStore()
			return nil, err
		}
		if cfg.Prewarm && b.fleet == nil { // in fleet mode: once the link has synced (it drops the cache)
			if err := prewarm(ctx, b.Svc); err != nil {
				b.closeStore()
				return nil, err
			}
		}
		if cfg.ReplayDir != "" {
			if b.replay, err = replay.Open(cfg.ReplayDir, replay.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}); err != nil {
				b.closeStore()
				return nil, err
			}
		}
		var guard hook.ReplayGuard // nil: the hook's in-memory guard
		if b.replay != nil {
			guard = b.replay
		}
		b.reg = prometheus.NewRegistry()
		hopts := hook.Options{Registry: b.Svc, Server: b.Server, ReplayGuard: guard, StoreTimeout: cfg.StoreTimeout,
			Registerer: b.reg,
			// Every login is recorded, as in the broker (whose table also
			// writes the changes to a file, off the login path).
			LastSeen: lastseen.NewMemory(),
			// The hook's security events are formatted as in production,
			// then discarded.
			Logger: slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelInfo}))}
		if cfg.ThrottlePeriod > 0 {
			hopts.Throttle = hook.DefaultThrottleOptions()
			hopts.Throttle.Base, hopts.Throttle.Max = cfg.ThrottlePeriod, cfg.ThrottlePeriod
		}
		if b.fleet != nil {
			b.fleet.wire(&hopts)
		}
		b.Hook, err = hook.New(hopts)
		if err != nil {
			b.closeStore()
			return nil, err
		}
		if err := b.Server.AddHook(b.Hook, nil); err != nil {
			b.closeStore()
			return nil, err
		}
		if b.fleet != nil {
			if err := b.fleet.attach(ctx, b.Hook, b.Svc); err != nil {
				b.closeStore()
				return nil, err
			}
			if cfg.Prewarm {
				if err := prewarm(ctx, b.Svc); err != nil {
					b.closeStore()
					return nil, err
				}
			}
		}
	default:
		return nil, fmt.Errorf("unknown mode %q (allow or hook)", cfg.Mode)
	}
	listen := cfg.Listen
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		b.closeStore()
		return nil, err
	}
	if err := b.Server.AddListener(listeners.NewNet("tcp", ln)); err != nil {
		ln.Close()
		b.closeStore()
		return nil, err
	}
	go b.Server.Serve()
	b.Addr = ln.Addr().String()
	return b, nil
}

// prewarm looks every stored terminal up once, so that logins are served
// from the cache.
func prewarm(ctx context.Context, svc *keysvc.Service) error {
	after := ""
	for {
		ts, next, err := svc.List(ctx, after, 1000)
		if err != nil {
			return fmt.Errorf("prewarm: %w", err)
		}
		for _, t := range ts {
			if _, err := svc.Lookup(ctx, t.SN); err != nil {
				return fmt.Errorf("prewarm %s: %w", t.SN, err)
			}
		}
		if next == "" {
			return nil
		}
		after = next
	}
}

// closeStore leaves the fleet and closes the replay guard and the store.
func (b *Broker) closeStore() {
	if b.fleet != nil {
		b.fleet.close()
	}
	if b.replay != nil {
		b.replay.Close()
	}
	if b.store != nil {
		b.store.Close()
	}
}

// Close stops the broker (through mochifix, never mochi's Close alone:
// mochi-mqtt/server#488) and closes its replay guard and store.
func (b *Broker) Close() error {
	err := mochifix.Close(b.Server, []string{"tcp"}, 30*time.Second)
	b.closeStore()
	return err
}

// MemReport is the broker process's memory after a full GC.
type MemReport struct {
	HeapAlloc  uint64 `json:"heap_alloc"`
	HeapInuse  uint64 `json:"heap_inuse"`
	StackInuse uint64 `json:"stack_inuse"`
	Sys        uint64 `json:"sys"`
	Goroutines int    `json:"goroutines"`
	Clients    int    `json:"clients"`
	RSS        uint64 `json:"rss"` // resident set size of the process (VmRSS), 0 where /proc has none
}

// Mem runs two full GCs and reads the memory statistics.
func (b *Broker) Mem() MemReport {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return MemReport{HeapAlloc: m.HeapAlloc, HeapInuse: m.HeapInuse, StackInuse: m.StackInuse, Sys: m.Sys,
		Goroutines: runtime.NumGoroutine(), Clients: b.Server.Clients.Len(), RSS: processRSS()}
}

// openFiles counts this process's open file descriptors (-1 where /proc
// has none).
func openFiles() int {
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(es) - 1 // ReadDir's own
}

// processRSS returns this process's resident set size in bytes (VmRSS of
// /proc/self/status), 0 if it cannot be read.
func processRSS() uint64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			var kb uint64
			fmt.Sscanf(strings.TrimSpace(v), "%d", &kb)
			return kb << 10
		}
	}
	return 0
}

// Claims returns the latencies of the fleet's replay claims since the
// last call (zero outside fleet mode).
func (b *Broker) Claims() stats.Latency {
	if b.fleet == nil {
		return stats.Latency{}
	}
	return b.fleet.claims.take()
}

// CacheStats returns the key service's cache counters (zero in allow mode).
func (b *Broker) CacheStats() keysvc.CacheStats {
	if b.Svc == nil {
		return keysvc.CacheStats{}
	}
	return b.Svc.CacheStats()
}

// Logins returns the hook's login counts so far (its metric
// m2mguard_logins_total): "accepted", and "refused/<reason>" for each
// reason counted; nil in allow mode.
func (b *Broker) Logins() (map[string]float64, error) {
	if b.reg == nil {
		return nil, nil
	}
	mfs, err := b.reg.Gather()
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "m2mguard_logins_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			var result, reason string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "result":
					result = l.GetValue()
				case "reason":
					reason = l.GetValue()
				}
			}
			if v := m.GetCounter().GetValue(); v > 0 {
				key := result
				if reason != "" {
					key += "/" + reason
				}
				out[key] += v
			}
		}
	}
	return out, nil
}

package keysvc

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// CacheOptions configure the read cache in front of the store (see
// Service.Lookup). A zero field takes the value of DefaultCacheOptions.
type CacheOptions struct {
	// MaxEntries bounds the number of cached records. When full, an
	// arbitrary entry of the same shard is evicted.
	MaxEntries int
	// TTL is how long an entry is served without asking the store.
	TTL time.Duration
	// MaxStale is how long past its fetch an entry may still be served while
	// the store answers ErrUnavailable; negative = never.
	MaxStale time.Duration
	// NegativeTTL is how long "no such terminal" is remembered; negative =
	// not at all.
	NegativeTTL time.Duration
}

// DefaultCacheOptions returns the value the Service gives each zero field
// of CacheOptions.
func DefaultCacheOptions() CacheOptions {
	return CacheOptions{MaxEntries: 100000, TTL: 30 * time.Second, MaxStale: 10 * time.Minute, NegativeTTL: 2 * time.Second}
}

// CacheStats are the cache counters since the Service was created.
type CacheStats struct {
	Hits        uint64 // served fresh from the cache, positive or negative
	Misses      uint64 // asked the store
	Stale       uint64 // served a stale entry because the store was unavailable
	FailClosed  uint64 // refused because the store was unavailable and nothing usable was cached
	Evictions   uint64 // entries dropped to respect MaxEntries
	Invalidated uint64 // entries dropped by a write (this Service's, or another broker's through Invalidate)
	Coalesced   uint64 // lookups that waited for another lookup's store read of the same sn instead of reading it again
}

const cacheShards = 64

type cacheEntry struct {
	t       *Terminal // nil: negative entry (not found)
	fetched int64     // unix nanoseconds, from the Service clock
}

type flight struct {
	done chan struct{}
	t    *Terminal
	err  error
}

type cacheShard struct {
	mu      sync.RWMutex
	m       map[string]cacheEntry
	gen     map[string]uint64 // bumped by drop; a fill started under an older gen is discarded
	flights map[string]*flight
	hits    atomic.Uint64
	_       [40]byte // keep hot counters of neighbouring shards on separate cache lines
}

type cache struct {
	shards   [cacheShards]cacheShard
	perShard int
	ttl      int64
	maxStale int64
	negTTL   int64
	now      func() time.Time
	load     func(ctx context.Context, sn string) (*Terminal, error)

	misses, stale, failClosed, evictions, invalidated, coalesced atomic.Uint64
}

func newCache(o CacheOptions, now func() time.Time, load func(context.Context, string) (*Terminal, error)) *cache {
	def := DefaultCacheOptions()
	if o.MaxEntries <= 0 {
		o.MaxEntries = def.MaxEntries
	}
	if o.TTL <= 0 {
		o.TTL = def.TTL
	}
	if o.MaxStale == 0 { // negative: never
		o.MaxStale = def.MaxStale
	}
	if o.NegativeTTL == 0 { // negative: not at all
		o.NegativeTTL = def.NegativeTTL
	}
	c := &cache{
		perShard: max(1, (o.MaxEntries+cacheShards-1)/cacheShards),
		ttl:      int64(o.TTL), maxStale: int64(o.MaxStale), negTTL: int64(o.NegativeTTL),
		now: now, load: load,
	}
	for i := range c.shards {
		c.shards[i].m = make(map[string]cacheEntry)
		c.shards[i].gen = make(map[string]uint64)
		c.shards[i].flights = make(map[string]*flight)
	}
	return c
}

func (c *cache) shard(sn string) *cacheShard {
	h := uint32(2166136261) // FNV-1a
	for i := 0; i < len(sn); i++ {
		h ^= uint32(sn[i])
		h *= 16777619
	}
	return &c.shards[h%cacheShards]
}

// get returns the record of sn: from the cache while fresh, else from the
// store (one call per sn however many callers wait), else stale within
// MaxStale if the store is unavailable.
func (c *cache) get(ctx context.Context, sn string) (*Terminal, error) {
	sh := c.shard(sn)
	now := c.now().UnixNano()
	sh.mu.RLock()
	e, ok := sh.m[sn]
	sh.mu.RUnlock()
	if ok {
		age := now - e.fetched
		if e.t != nil && age < c.ttl || e.t == nil && age < c.negTTL {
			sh.hits.Add(1)
			if e.t == nil {
				return nil, ErrNotFound
			}
			return e.t, nil
		}
	}
	return c.refresh(ctx, sh, sn, e, ok)
}

func (c *cache) refresh(ctx context.Context, sh *cacheShard, sn string, old cacheEntry, haveOld bool) (*Terminal, error) {
	sh.mu.Lock()
	f, running := sh.flights[sn]
	if !running {
		f = &flight{done: make(chan struct{})}
		sh.flights[sn] = f
	}
	gen := sh.gen[sn]
	sh.mu.Unlock()
	if running {
		c.coalesced.Add(1)
		select {
		case <-f.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	} else {
		c.misses.Add(1)
		f.t, f.err = c.load(ctx, sn)
		sh.mu.Lock()
		delete(sh.flights, sn)
		if sh.gen[sn] == gen {
			switch {
			case f.err == nil:
				c.put(sh, sn, cacheEntry{t: f.t, fetched: c.now().UnixNano()})
			case errors.Is(f.err, ErrNotFound) && c.negTTL > 0:
				c.put(sh, sn, cacheEntry{fetched: c.now().UnixNano()})
			case errors.Is(f.err, ErrNotFound):
				delete(sh.m, sn)
			}
		}
		sh.mu.Unlock()
		close(f.done)
	}
	if f.err == nil {
		return f.t, nil
	}
	if errors.Is(f.err, ErrUnavailable) {
		if haveOld && old.t != nil && c.maxStale > 0 && c.now().UnixNano()-old.fetched < c.maxStale {
			c.stale.Add(1)
			return old.t, nil
		}
		c.failClosed.Add(1)
	}
	return nil, f.err
}

// put stores an entry; sh.mu must be held.
func (c *cache) put(sh *cacheShard, sn string, e cacheEntry) {
	if _, ok := sh.m[sn]; !ok && len(sh.m) >= c.perShard {
		for k := range sh.m {
			delete(sh.m, k)
			c.evictions.Add(1)
			break
		}
	}
	sh.m[sn] = e
}

// drop forgets sn at once (a local write) and voids fills in flight.
func (c *cache) drop(sn string) {
	sh := c.shard(sn)
	sh.mu.Lock()
	if _, ok := sh.m[sn]; ok {
		delete(sh.m, sn)
		c.invalidated.Add(1)
	}
	if _, running := sh.flights[sn]; running {
		sh.gen[sn]++
	} else {
		delete(sh.gen, sn) // nobody holds the old gen: keep the map small
	}
	sh.mu.Unlock()
}

// dropAll forgets every entry and voids every fill in flight.
func (c *cache) dropAll() {
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		c.invalidated.Add(uint64(len(sh.m)))
		clear(sh.m)
		for sn := range sh.flights {
			sh.gen[sn]++
		}
		sh.mu.Unlock()
	}
}

func (c *cache) stats() CacheStats {
	s := CacheStats{
		Misses: c.misses.Load(), Stale: c.stale.Load(), FailClosed: c.failClosed.Load(),
		Evictions: c.evictions.Load(), Invalidated: c.invalidated.Load(), Coalesced: c.coalesced.Load(),
	}
	for i := range c.shards {
		s.Hits += c.shards[i].hits.Load()
	}
	return s
}

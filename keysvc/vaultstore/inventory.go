package vaultstore

import (
	"context"
	"errors"
	"path"
	"slices"
	"sort"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/m2mguard/m2mguard/keysvc"
)

// Inventory at scale: Vault can only LIST a whole directory, so the store
// keeps the sorted serial numbers of the terminals path for
// Options.ListCacheTTL and answers the pages of ListTerminals from it; its
// own creates and deletes update the list at once, so this broker never
// misses its own writes, and another broker's show within the TTL. The
// records of a page (GetTerminals) and the records of an import batch
// (CreateTerminals) go to Vault concurrently, at most Options.Parallel
// requests at a time.

// Defaults of Options.ListCacheTTL and Options.Parallel.
const (
	DefaultListCacheTTL = 10 * time.Second
	DefaultParallel     = 16
)

var (
	_ keysvc.BulkCreator = (*Store)(nil)
	_ keysvc.BulkReader  = (*Store)(nil)
)

// keyList is the cached listing of the terminals path.
type keyList struct {
	ttl time.Duration // < 0: no cache
	now func() time.Time

	mu      sync.Mutex
	keys    []string  // sorted; nil = nothing cached
	fetched time.Time // when keys was listed
	gen     uint64    // bumped by every create and delete of this store
}

// page returns up to limit keys after after from the cache, if it is
// fresh.
func (l *keyList) page(after string, limit int) ([]string, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.keys == nil || l.now().Sub(l.fetched) >= l.ttl {
		return nil, false
	}
	return pageOf(l.keys, after, limit), true
}

// generation returns the counter of this store's writes; take it before a
// LIST.
func (l *keyList) generation() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.gen
}

// fill caches keys, listed when the write counter was gen, unless this
// store created or deleted a terminal since (the listing may miss it).
func (l *keyList) fill(keys []string, gen uint64, at time.Time) {
	if l.ttl < 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.gen == gen {
		l.keys, l.fetched = keys, at
	}
}

// added and removed keep a cached listing in step with this store's writes.
func (l *keyList) added(sn string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.gen++
	if i, found := slices.BinarySearch(l.keys, sn); !found && l.keys != nil {
		l.keys = slices.Insert(l.keys, i, sn)
	}
}

func (l *keyList) removed(sn string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.gen++
	if i, found := slices.BinarySearch(l.keys, sn); found {
		l.keys = slices.Delete(l.keys, i, i+1)
	}
}

// pageOf returns a copy of up to limit keys greater than after (limit <= 0:
// all of them).
func pageOf(keys []string, after string, limit int) []string {
	i := sort.SearchStrings(keys, after)
	if i < len(keys) && keys[i] == after {
		i++
	}
	keys = keys[i:]
	if limit > 0 && len(keys) > limit {
		keys = keys[:limit]
	}
	return slices.Clone(keys)
}

// ListTerminals implements keysvc.Store: a page of the cached listing, or
// of a fresh LIST when the cache is older than Options.ListCacheTTL.
func (s *Store) ListTerminals(ctx context.Context, after string, limit int) ([]string, error) {
	if keys, ok := s.listing.page(after, limit); ok {
		return keys, nil
	}
	gen := s.listing.generation()
	at := s.listing.now()
	keys, err := s.list(ctx, path.Join(s.prefix, "terminals"))
	if err != nil {
		return nil, err
	}
	if keys == nil {
		keys = []string{}
	}
	s.listing.fill(keys, gen, at)
	return pageOf(keys, after, limit), nil
}

// GetTerminals implements keysvc.BulkReader: the records of sns, read
// concurrently (at most Options.Parallel at a time), in order; nil for one
// that does not exist. The first other error ends it.
func (s *Store) GetTerminals(ctx context.Context, sns []string) ([]*keysvc.Terminal, error) {
	out := make([]*keysvc.Terminal, len(sns))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(s.parallel)
	for i, sn := range sns {
		g.Go(func() error {
			t, err := s.GetTerminal(gctx, sn)
			if errors.Is(err, keysvc.ErrNotFound) {
				return nil
			}
			out[i] = t
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return out, nil
}

// CreateTerminals implements keysvc.BulkCreator: each record is created
// as by CreateTerminal (check-and-set 0), at most Options.Parallel at a
// time. Vault has no transaction over several entries, so a failure leaves
// the others stored: the error of each record says what became of it.
// Once the store fails (unavailable, forbidden), the records not yet sent
// are not sent and get that error.
func (s *Store) CreateTerminals(ctx context.Context, ts []*keysvc.Terminal) ([]error, error) {
	errs := make([]error, len(ts))
	var mu sync.Mutex
	var stop error // the first failure of the store itself
	var g errgroup.Group
	g.SetLimit(s.parallel)
	for i, t := range ts {
		mu.Lock()
		failed := stop
		mu.Unlock()
		if failed != nil {
			errs[i] = failed
			continue
		}
		g.Go(func() error {
			err := s.CreateTerminal(ctx, t)
			errs[i] = err
			if err != nil && !errors.Is(err, keysvc.ErrExists) && !errors.Is(err, keysvc.ErrInvalid) {
				mu.Lock()
				if stop == nil {
					stop = err
				}
				mu.Unlock()
			}
			return nil
		})
	}
	g.Wait()
	return errs, nil
}

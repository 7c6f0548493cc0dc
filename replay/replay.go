// Package replay remembers the (serial number, nonce) pairs of accepted
// M2M1 logins and control messages until they can no longer pass the skew
// check, so that each is accepted once (SPEC section 3, step 6, and
// section 7) — also after the broker restarts.
//
// A Guard claims a pair atomically: the first Claim of a pair returns true,
// every later one false until the claim expires. NewMemory keeps claims in
// memory only (they are lost when the process ends). Open also appends each
// claim to a file, with one write(2) that completes before Claim returns:
// once the caller acts on a claim (sends a CONNACK), the kernel holds it,
// and killing the process (kill -9) cannot lose it. There is no fsync per
// claim: a background goroutine fsyncs every Options.SyncEvery (1 s by
// default), so a power loss or a kernel crash can lose the claims of the
// last interval — and only those.
//
// Files are cut by the window (Options.Window, 10 minutes by default) in
// which their claims expire: one file per window, removed whole once the
// window has passed, so that nothing is ever compacted. Records have a
// fixed size and a CRC-32C; a torn or corrupt record is skipped on load.
// Memory holds the unexpired claims only, that is the genuine messages
// accepted within the skew window (the caller claims after the digest has
// verified).
package replay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"
)

// Options configure a Guard. The zero value is ready to use: a zero
// duration takes the value of DefaultOptions.
type Options struct {
	// Window is the span of expiry times whose claims share one file (and
	// one map in memory); it is rounded down to whole seconds, at least
	// 1 s.
	Window time.Duration
	// SyncEvery is the interval of the background fsync of Open's files,
	// that is how many claims a power loss can lose.
	SyncEvery time.Duration
	// Now is the clock that claims expire by; nil = time.Now. Use the
	// clock of the caller that computes until.
	Now func() time.Time
	// Logger receives what Open loaded and background sync failures; nil =
	// slog.Default(). It never sees a nonce.
	Logger *slog.Logger
}

// DefaultOptions returns the value NewMemory and Open give each zero
// duration of Options.
func DefaultOptions() Options {
	return Options{Window: 10 * time.Minute, SyncEvery: time.Second}
}

// ErrClosed is returned by Claim after Close.
var ErrClosed = errors.New("replay: guard closed")

// Guard is a set of claimed (sn, nonce) pairs. Its methods are safe for
// concurrent use.
type Guard struct {
	now    func() time.Time
	window int64 // seconds
	log    *slog.Logger

	mu     sync.Mutex
	gens   []*generation // by end, ascending
	closed bool
	disk   *disk // nil for a memory guard
}

// generation holds the claims that expire in one window.
type generation struct {
	end    int64         // unix seconds: every until in it is before
	claims map[key]int64 // until, unix nanoseconds
}

// NewMemory returns a guard that keeps its claims in memory only. It
// starts no goroutine; Close is optional.
func NewMemory(opts Options) *Guard {
	w := opts.Window
	if w <= 0 {
		w = DefaultOptions().Window
	}
	g := &Guard{now: opts.Now, window: max(int64(w/time.Second), 1), log: opts.Logger}
	if g.now == nil {
		g.now = time.Now
	}
	if g.log == nil {
		g.log = slog.Default()
	}
	return g
}

// Claim claims the pair (sn, nonce) until the given time. It returns true
// if the pair was not claimed (the caller may accept the message), false if
// it is claimed already (a replay), and an error if the guard cannot tell
// or cannot record the claim (the caller must refuse). sn is 1 to
// MaxSNLen bytes; until must be after now.
//
// A guard from Open has written the claim to its file when Claim returns
// true.
func (g *Guard) Claim(ctx context.Context, sn string, nonce uint64, until time.Time) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	k, err := newKey(sn, nonce)
	if err != nil {
		return false, err
	}
	now := g.now()
	if !until.After(now) {
		return false, fmt.Errorf("%w: until %s is not after now", ErrInvalid, until.UTC().Format(time.RFC3339))
	}
	u := until.UnixNano()
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return false, ErrClosed
	}
	g.dropExpired(now)
	if g.claimed(k, now.UnixNano()) {
		g.mu.Unlock()
		return false, nil
	}
	end := g.windowEnd(until)
	if g.disk != nil {
		end = max(end, g.disk.horizon+g.window) // never into a file already removed
	}
	gen := g.generation(end)
	gen.claims[k] = u
	if g.disk == nil {
		g.mu.Unlock()
		return true, nil
	}
	seg, err := g.disk.segment(end)
	if err != nil {
		delete(gen.claims, k)
		g.mu.Unlock()
		return false, err
	}
	seg.writers.Add(1)
	g.mu.Unlock()

	err = seg.write(k, u)
	seg.writers.Done()
	if err != nil {
		// Not recorded, so not accepted: the pair is free again.
		g.mu.Lock()
		if gen := g.find(end); gen != nil && gen.claims[k] == u {
			delete(gen.claims, k)
		}
		g.mu.Unlock()
		return false, err
	}
	return true, nil
}

// Len returns the number of claims held in memory (expired ones included
// until their window is dropped).
func (g *Guard) Len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, gen := range g.gens {
		n += len(gen.claims)
	}
	return n
}

// Close stops the background sync of Open's guard, waits for claims being
// written, fsyncs and closes its files and releases the directory. Claim
// then returns ErrClosed. It is safe to call more than once.
func (g *Guard) Close() error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.closed = true
	d := g.disk
	g.mu.Unlock()
	if d == nil {
		return nil
	}
	return d.close()
}

// windowEnd is the end of the window in which until falls.
func (g *Guard) windowEnd(until time.Time) int64 {
	s := until.Unix()
	return (s/g.window + 1) * g.window
}

// claimed reports whether k has an unexpired claim. Called with mu held.
func (g *Guard) claimed(k key, now int64) bool {
	for _, gen := range g.gens {
		if u, ok := gen.claims[k]; ok && u > now {
			return true
		}
	}
	return false
}

// generation returns the generation that ends at end, creating it. Called
// with mu held.
func (g *Guard) generation(end int64) *generation {
	i, found := slices.BinarySearchFunc(g.gens, end, func(gen *generation, end int64) int {
		switch {
		case gen.end < end:
			return -1
		case gen.end > end:
			return 1
		}
		return 0
	})
	if found {
		return g.gens[i]
	}
	gen := &generation{end: end, claims: make(map[key]int64)}
	g.gens = slices.Insert(g.gens, i, gen)
	return gen
}

func (g *Guard) find(end int64) *generation {
	for _, gen := range g.gens {
		if gen.end == end {
			return gen
		}
	}
	return nil
}

// dropExpired drops the generations whose window has passed: all their
// claims have expired. Called with mu held.
func (g *Guard) dropExpired(now time.Time) {
	s := now.Unix()
	i := 0
	for i < len(g.gens) && g.gens[i].end <= s {
		i++
	}
	if i > 0 {
		g.gens = slices.Delete(g.gens, 0, i)
	}
}

// insert adds a claim read from a file, keeping the later until of a pair
// that is in two files.
func (g *Guard) insert(k key, until int64) {
	end := g.windowEnd(time.Unix(0, until))
	for _, gen := range g.gens {
		if u, ok := gen.claims[k]; ok && u >= until {
			return
		}
	}
	g.generation(end).claims[k] = until
}

// Open returns a guard whose claims are also written to files in dir
// (created 0700; files 0600). It loads the unexpired claims found there,
// removes expired files and starts the background fsync, which Close
// stops. One process at a time may hold dir: Open fails while another
// holds it.
func Open(dir string, opts Options) (*Guard, error) {
	g := NewMemory(opts)
	every := opts.SyncEvery
	if every <= 0 {
		every = DefaultOptions().SyncEvery
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("replay: %w", err)
	}
	d, err := openDisk(dir)
	if err != nil {
		return nil, err
	}
	g.disk = d
	st, err := d.load(g, g.now())
	if err != nil {
		d.unlock()
		return nil, err
	}
	g.log.Info("replay guard opened", "dir", dir, "files", st.files, "claims", st.claims,
		"expired_files_removed", st.removed, "corrupt_bytes_skipped", st.skipped)
	d.start(g, every)
	return g, nil
}

// Package campaign runs fleet-wide credential changes. A campaign selects
// terminals (all, those with a credential expiring before a date, a list,
// those of a status), starts a change of what (pwd, bk or all) for each
// through the hook at a bounded rate, and follows every change to its
// outcome: delivered, committed or expired, or skipped (busy: another
// change was pending; inactive: the terminal is disabled), or failed.
//
// Its state lives in the key service's store (keysvc.CampaignStore): the
// campaign with its cursor (the last serial number handled, in sorted
// order) and counts, and one item per terminal. Before a batch of changes
// starts, an intent item is written for each of them; a broker that stops
// or dies mid-campaign resumes after its cursor, and for a terminal whose
// intent is all it finds it looks at the terminal's record first: a change
// started after the intent (pending, or committed since) is taken as the
// campaign's, so no terminal gets two changes from one campaign.
//
// Outcomes follow the hook's change events (Runner is an events.Sink): a
// change_delivered, _committed or _expired event moves the terminal's item
// on. The store is read for a change only where no event can be expected:
// when a campaign resumes, and once a change is past its deadline (the
// hook's expiry watch does not survive a restart either).
//
// One Runner per broker, one goroutine: New, Start, then Close. In a fleet
// of brokers the walk must run once: Options.Lease says when this broker
// holds it (the default, Local, always does).
//
//	r, err := campaign.New(campaign.Options{Keys: svc, Starter: hook})
//	r.Start()
//	defer r.Close()
//	c, err := r.Create(ctx, keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectAll}, What: codec.WhatPwd, Rate: 100})
package campaign

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Keys is what the runner needs of the key service; *keysvc.Service
// implements it.
type Keys interface {
	Get(ctx context.Context, sn string) (*keysvc.Terminal, error)
	List(ctx context.Context, after string, limit int) ([]*keysvc.Terminal, string, error)
	CreateCampaign(ctx context.Context, r keysvc.CampaignRequest) (*keysvc.Campaign, error)
	GetCampaign(ctx context.Context, id string) (*keysvc.Campaign, error)
	ListCampaigns(ctx context.Context) ([]string, error)
	UpdateCampaign(ctx context.Context, id string, fn func(*keysvc.Campaign) error) (*keysvc.Campaign, error)
	SaveCampaign(ctx context.Context, c *keysvc.Campaign) error
	PutCampaignItems(ctx context.Context, id string, items []keysvc.CampaignItem) error
	CampaignItems(ctx context.Context, id, after string, limit int) ([]keysvc.CampaignItem, error)
}

// Starter starts a platform-initiated change of a terminal and delivers it
// at once if the terminal is online; *hook.Hook implements it.
type Starter interface {
	StartChange(ctx context.Context, sn string, what codec.What) (*keysvc.Change, error)
}

// StarterFunc makes a function a Starter.
type StarterFunc func(ctx context.Context, sn string, what codec.What) (*keysvc.Change, error)

// StartChange calls f.
func (f StarterFunc) StartChange(ctx context.Context, sn string, what codec.What) (*keysvc.Change, error) {
	return f(ctx, sn, what)
}

// Lease says when this broker may walk campaigns: in a fleet, one broker
// at a time. Hold blocks until this broker holds the lease, or ctx ends,
// and returns a context that ends when the lease is lost (or ctx ends).
type Lease interface {
	Hold(ctx context.Context) (context.Context, error)
}

// Local is the Lease of a single broker: it always holds it.
type Local struct{}

// Hold returns ctx.
func (Local) Hold(ctx context.Context) (context.Context, error) { return ctx, ctx.Err() }

// Defaults of Options' zero fields.
const (
	DefaultMaxRate      = 100.0
	DefaultFlushEvery   = time.Second
	DefaultCheckEvery   = time.Minute
	DefaultRetryAfter   = 5 * time.Second
	DefaultStoreTimeout = 10 * time.Second
	// maxBatch bounds the terminals fetched (and their intents written)
	// at once: at most a second's worth of starts, at most this many.
	maxBatch = 100
	// itemPage is the page size when items are read back.
	itemPage = 1000
)

// Options configure a Runner. Keys and Starter are required; every zero
// field takes its default.
type Options struct {
	Keys    Keys
	Starter Starter
	// Lease: nil = Local (a single broker).
	Lease Lease
	// MaxRate is the highest rate (changes started per second) a campaign
	// may ask for: a stolen admin token cannot rotate the fleet faster.
	MaxRate float64
	// FlushEvery is how often outcomes, counts and the cursor are written
	// to the store.
	FlushEvery time.Duration
	// CheckEvery is how often changes past their deadline are looked up
	// (and the store is read for campaigns created on other brokers).
	CheckEvery time.Duration
	// RetryAfter is the pause after the store or the hook failed.
	RetryAfter time.Duration
	// StoreTimeout bounds one store call.
	StoreTimeout time.Duration
	Now          func() time.Time // nil = time.Now
	Logger       *slog.Logger     // nil = slog.Default()
}

// DefaultOptions returns the value each zero field of Options takes.
func DefaultOptions() Options {
	return Options{MaxRate: DefaultMaxRate, FlushEvery: DefaultFlushEvery, CheckEvery: DefaultCheckEvery,
		RetryAfter: DefaultRetryAfter, StoreTimeout: DefaultStoreTimeout}
}

// Errors of the Runner's API, besides the key service's (keysvc.ErrNotFound,
// keysvc.ErrInvalid, ...).
var (
	// ErrRunning: another campaign is still starting changes.
	ErrRunning = errors.New("campaign: another campaign is running")
	// ErrRate: the rate is above Options.MaxRate.
	ErrRate = errors.New("campaign: rate above the configured maximum")
	// ErrFinished: the campaign is done (or cancelled and finished): it
	// cannot be cancelled.
	ErrFinished = errors.New("campaign: already finished")
)

// Runner runs the campaigns of one broker. Its methods are safe for
// concurrent use.
type Runner struct {
	opts Options
	keys Keys
	log  *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	wake   chan struct{}
	start  sync.Once
	stop   sync.Once

	createMu sync.Mutex // one Create at a time

	mu          sync.Mutex           // guards what follows; never held over a store call
	serving     bool                 // the goroutine holds the lease and has loaded the campaigns
	active      map[string]*run      // campaigns still starting or following changes, by id
	outstanding map[itemKey]*tracked // changes not committed or expired yet
	starting    string               // the terminal whose change is being started
	early       []events.Event       // events of that terminal that came before its start returned
}

// New returns a Runner; Start starts it.
func New(opts Options) (*Runner, error) {
	if opts.Keys == nil || opts.Starter == nil {
		return nil, errors.New("campaign: Options.Keys and Options.Starter are required")
	}
	def := DefaultOptions()
	if opts.Lease == nil {
		opts.Lease = Local{}
	}
	if opts.MaxRate <= 0 {
		opts.MaxRate = def.MaxRate
	}
	orDefault(&opts.FlushEvery, def.FlushEvery)
	orDefault(&opts.CheckEvery, def.CheckEvery)
	orDefault(&opts.RetryAfter, def.RetryAfter)
	orDefault(&opts.StoreTimeout, def.StoreTimeout)
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	r := &Runner{opts: opts, keys: opts.Keys, log: opts.Logger,
		done: make(chan struct{}), wake: make(chan struct{}, 1),
		active: map[string]*run{}, outstanding: map[itemKey]*tracked{}}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	return r, nil
}

func orDefault(v *time.Duration, def time.Duration) {
	if *v <= 0 {
		*v = def
	}
}

// Start starts the runner's goroutine: it takes the lease, resumes the
// campaigns the store holds, and runs them until Close.
func (r *Runner) Start() {
	r.start.Do(func() { go r.loop() })
}

// Close stops the goroutine and waits for it; what it holds in memory
// (outcomes, counts, cursor) is written to the store first. It is safe to
// call more than once, and without Start.
func (r *Runner) Close() {
	r.stop.Do(func() {
		r.cancel()
		r.start.Do(func() { close(r.done) }) // never started: nothing to wait for
		<-r.done
	})
}

// signal wakes the goroutine (a campaign was created or cancelled, an
// outcome may have finished one).
func (r *Runner) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Create validates and stores a new campaign and has it start at once.
// ErrRate if its rate is above Options.MaxRate, ErrRunning if another
// campaign is still starting changes; keysvc.ErrInvalid for a bad request.
func (r *Runner) Create(ctx context.Context, req keysvc.CampaignRequest) (*keysvc.Campaign, error) {
	if req.Rate > r.opts.MaxRate {
		return nil, fmt.Errorf("%w: %g changes per second, at most %g", ErrRate, req.Rate, r.opts.MaxRate)
	}
	r.createMu.Lock()
	defer r.createMu.Unlock() // one Create at a time: the running check and the create go together
	if id, err := r.runningID(ctx); err != nil {
		return nil, err
	} else if id != "" {
		return nil, fmt.Errorf("%w: %s (cancel it, or wait until it has handled its selection)", ErrRunning, id)
	}
	c, err := r.keys.CreateCampaign(ctx, req)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	if r.serving {
		r.active[c.ID] = newRun(c.Clone(), r.opts.Now())
	}
	r.mu.Unlock()
	r.signal()
	r.log.Info("campaign created", "campaign", c.ID, "select", c.Selection.Kind, "what", string(c.What), "rate", c.Rate)
	return c, nil
}

// runningID returns the id of a campaign still starting changes, or "":
// from memory while this broker serves, else from the store.
func (r *Runner) runningID(ctx context.Context) (string, error) {
	r.mu.Lock()
	serving := r.serving
	for id, a := range r.active {
		if a.c.State == keysvc.CampaignRunning {
			r.mu.Unlock()
			return id, nil
		}
	}
	r.mu.Unlock()
	if serving {
		return "", nil
	}
	ids, err := r.keys.ListCampaigns(ctx)
	if err != nil {
		return "", err
	}
	for _, id := range ids {
		c, err := r.keys.GetCampaign(ctx, id)
		if err != nil {
			return "", err
		}
		if c.State == keysvc.CampaignRunning {
			return id, nil
		}
	}
	return "", nil
}

// Get returns a campaign: live from memory while this broker runs it,
// else as stored.
func (r *Runner) Get(ctx context.Context, id string) (*keysvc.Campaign, error) {
	r.mu.Lock()
	if a, ok := r.active[id]; ok {
		c := a.c.Clone()
		r.mu.Unlock()
		return c, nil
	}
	r.mu.Unlock()
	return r.keys.GetCampaign(ctx, id)
}

// List returns every campaign, sorted by id.
func (r *Runner) List(ctx context.Context) ([]*keysvc.Campaign, error) {
	ids, err := r.keys.ListCampaigns(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]*keysvc.Campaign, 0, len(ids))
	for _, id := range ids {
		c, err := r.Get(ctx, id)
		if errors.Is(err, keysvc.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// Cancel stops a campaign from starting further changes; changes already
// started go on and are still counted. Cancelling a cancelled campaign
// changes nothing; ErrFinished for a campaign that is done.
func (r *Runner) Cancel(ctx context.Context, id string) (*keysvc.Campaign, error) {
	r.mu.Lock()
	if a, ok := r.active[id]; ok {
		switch a.c.State {
		case keysvc.CampaignRunning, keysvc.CampaignTracking:
			a.c.State = keysvc.CampaignCancelled
			a.cDirty = true
		case keysvc.CampaignDone:
			r.mu.Unlock()
			return nil, ErrFinished
		}
		c := a.c.Clone()
		r.mu.Unlock()
		r.signal()
		r.log.Info("campaign cancelled", "campaign", id)
		return c, nil
	}
	r.mu.Unlock()
	c, err := r.keys.UpdateCampaign(ctx, id, func(c *keysvc.Campaign) error {
		switch c.State {
		case keysvc.CampaignRunning, keysvc.CampaignTracking:
			c.State = keysvc.CampaignCancelled
		case keysvc.CampaignDone:
			return ErrFinished
		}
		return nil
	})
	if err == nil {
		r.log.Info("campaign cancelled", "campaign", id)
	}
	return c, err
}

// Items returns the terminals of campaign id in serial-number order after
// after, those of outcome only if it is not "", at most limit (1 to 1000)
// of them, and the serial number to pass as after for more ("" at the
// end). It reads at most 10 pages of the store per call, so next may come
// with fewer than limit items. Outcomes still in memory (at most
// Options.FlushEvery old) are shown as they are.
func (r *Runner) Items(ctx context.Context, id string, outcome keysvc.Outcome, after string, limit int) ([]keysvc.CampaignItem, string, error) {
	limit = max(1, min(limit, itemPage))
	var out []keysvc.CampaignItem
	for range 10 {
		stored, err := r.keys.CampaignItems(ctx, id, after, itemPage)
		if err != nil {
			return nil, "", err
		}
		last := len(stored) < itemPage // the store has nothing after this page
		page := r.overlay(id, after, stored, last)
		for i, it := range page {
			if outcome == "" || it.Outcome == outcome {
				out = append(out, it)
				if len(out) == limit {
					if i == len(page)-1 && last {
						return out, "", nil
					}
					return out, it.SN, nil
				}
			}
		}
		if last {
			return out, "", nil
		}
		after = stored[len(stored)-1].SN
	}
	return out, after, nil
}

// overlay returns a page of campaign id's items as they are now: the
// stored page, with the items of its range (after the SN after, up to the
// page's last one, or to the end if last) that changed in memory since
// they were written, or were never written yet, in their newer state, in
// serial-number order.
func (r *Runner) overlay(id, after string, page []keysvc.CampaignItem, last bool) []keysvc.CampaignItem {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.active[id]
	if !ok {
		return page
	}
	inRange := func(sn string) bool {
		return sn > after && (last || (len(page) > 0 && sn <= page[len(page)-1].SN))
	}
	newer := map[string]keysvc.CampaignItem{}
	for sn, tr := range a.tracking {
		if inRange(sn) {
			newer[sn] = tr.item
		}
	}
	for sn, it := range a.dirty {
		if inRange(sn) {
			newer[sn] = it
		}
	}
	if len(newer) == 0 {
		return page
	}
	out := make([]keysvc.CampaignItem, 0, len(page)+len(newer))
	for _, it := range page {
		if n, ok := newer[it.SN]; ok {
			it = n
			delete(newer, it.SN)
		}
		out = append(out, it)
	}
	for _, it := range newer {
		out = append(out, it) // not written yet
	}
	slices.SortFunc(out, func(x, y keysvc.CampaignItem) int { return strings.Compare(x.SN, y.SN) })
	return out
}

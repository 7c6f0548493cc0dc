package keysvc

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/m2mguard/m2mguard/codec"
)

// Fleet-wide credential changes. A campaign selects terminals (Selection),
// starts a change of What for each at Rate changes per second, and follows
// every change to its Outcome. The key service stores the campaign (its
// cursor: the last serial number handled, in sorted order, and its counts)
// and one CampaignItem per terminal handled, so that a restarted broker
// resumes it where it stopped; package campaign runs it.

// CampaignState is where a campaign is in its life.
type CampaignState string

// The states of a campaign.
const (
	// CampaignRunning: walking its selection, starting changes.
	CampaignRunning CampaignState = "running"
	// CampaignTracking: every terminal of the selection handled; waiting
	// for changes started to commit or expire.
	CampaignTracking CampaignState = "tracking"
	// CampaignDone: every change started committed or expired.
	CampaignDone CampaignState = "done"
	// CampaignCancelled: an operator cancelled it; no further change
	// starts, those started go on (and are still counted).
	CampaignCancelled CampaignState = "cancelled"
)

// Active reports whether the campaign still starts or follows changes.
func (s CampaignState) Active() bool {
	return s == CampaignRunning || s == CampaignTracking || s == CampaignCancelled
}

// Selection kinds.
const (
	SelectAll      = "all"      // every terminal
	SelectExpiring = "expiring" // terminals with a credential the change replaces expiring before Selection.Before
	SelectList     = "list"     // the serial numbers of Selection.SNs
	SelectStatus   = "status"   // terminals whose status is Selection.Status
)

// MaxCampaignList bounds the serial numbers of a list selection.
const MaxCampaignList = 100_000

// Selection says which terminals a campaign changes.
type Selection struct {
	Kind   string    // SelectAll, SelectExpiring, SelectList or SelectStatus
	Before time.Time // SelectExpiring
	Status Status    // SelectStatus
	SNs    []string  // SelectList: sorted, no duplicates (CreateCampaign sorts them)
}

// Matches reports whether terminal t belongs to the selection of a change
// of what. A list selection matches every terminal it is asked about (the
// list itself is walked).
func (s *Selection) Matches(t *Terminal, what codec.What) bool {
	switch s.Kind {
	case SelectStatus:
		return t.Status == s.Status
	case SelectExpiring:
		before := func(exp uint32) bool {
			return exp != codec.Never && time.Unix(int64(exp), 0).Before(s.Before)
		}
		pwd := before(t.Creds.UpExp) || before(t.Creds.DownExp)
		bk := before(t.Creds.BKExp)
		return what.Passwords() && pwd || what.BasicKey() && bk
	}
	return true
}

// Outcome is where one terminal's change of a campaign stands.
type Outcome string

// The outcomes. Every terminal a campaign handled has exactly one.
const (
	OutcomeWaiting   Outcome = "waiting"   // started; not delivered yet (offline: it goes out at its next login)
	OutcomeDelivered Outcome = "delivered" // the new values were sent; not acknowledged yet
	OutcomeCommitted Outcome = "committed" // acknowledged and committed
	OutcomeExpired   Outcome = "expired"   // passed its deadline, or was cancelled (disable, rekey), uncommitted: the old values stay
	OutcomeBusy      Outcome = "busy"      // skipped: another change was pending
	OutcomeInactive  Outcome = "inactive"  // skipped: the terminal is disabled
	OutcomeFailed    Outcome = "failed"    // no change started (the terminal was deleted, or the start failed; see Reason)

	// OutcomeStarting is an intent: the campaign is about to start a
	// change for the terminal. Its RID is then the terminal's last
	// committed change at that moment, and Updated the moment, so that a
	// campaign that resumes can tell whether the change started. It is
	// never counted.
	OutcomeStarting Outcome = "starting"
)

// Outcomes lists every outcome, in the order reports show them.
func Outcomes() []Outcome {
	return []Outcome{OutcomeWaiting, OutcomeDelivered, OutcomeCommitted, OutcomeExpired, OutcomeBusy, OutcomeInactive, OutcomeFailed}
}

// Final reports whether the outcome can no longer change: committed,
// expired, busy, inactive or failed.
func (o Outcome) Final() bool {
	return o.Valid() && o != OutcomeWaiting && o != OutcomeDelivered && o != OutcomeStarting
}

// Valid reports whether o is one of the outcomes, or OutcomeStarting.
func (o Outcome) Valid() bool { return o == OutcomeStarting || slices.Contains(Outcomes(), o) }

// CampaignCounts count the terminals of a campaign by outcome.
type CampaignCounts struct {
	Waiting, Delivered, Committed, Expired, Busy, Inactive, Failed int
}

// Of returns the count of outcome o (0 for no outcome).
func (c *CampaignCounts) Of(o Outcome) int {
	if f := c.field(o); f != nil {
		return *f
	}
	return 0
}

// Add adds n to the count of outcome o (nothing for no outcome).
func (c *CampaignCounts) Add(o Outcome, n int) {
	if f := c.field(o); f != nil {
		*f += n
	}
}

// Handled is the number of terminals handled: the sum of every count.
func (c *CampaignCounts) Handled() int {
	return c.Waiting + c.Delivered + c.Committed + c.Expired + c.Busy + c.Inactive + c.Failed
}

// Outstanding is the number of changes not yet committed or expired.
func (c *CampaignCounts) Outstanding() int { return c.Waiting + c.Delivered }

func (c *CampaignCounts) field(o Outcome) *int {
	switch o {
	case OutcomeWaiting:
		return &c.Waiting
	case OutcomeDelivered:
		return &c.Delivered
	case OutcomeCommitted:
		return &c.Committed
	case OutcomeExpired:
		return &c.Expired
	case OutcomeBusy:
		return &c.Busy
	case OutcomeInactive:
		return &c.Inactive
	case OutcomeFailed:
		return &c.Failed
	}
	return nil
}

// Campaign is the stored record of a fleet-wide credential change.
type Campaign struct {
	ID        string // 16 lower-case hex digits
	Selection Selection
	What      codec.What
	Rate      float64 // changes started per second
	State     CampaignState
	// Cursor is the last serial number of the selection handled, in
	// sorted order ("" = none yet): a resumed campaign goes on after it.
	Cursor   string
	Counts   CampaignCounts
	Created  time.Time // UTC, second precision
	Updated  time.Time
	Finished time.Time // when every terminal was handled (zero until then)
	// Version is the store's opaque check-and-set version, as for a
	// Terminal.
	Version uint64
}

// Clone returns a deep copy of c (nil for nil).
func (c *Campaign) Clone() *Campaign {
	if c == nil {
		return nil
	}
	n := *c
	n.Selection.SNs = slices.Clone(c.Selection.SNs)
	return &n
}

// CampaignItem is one terminal a campaign handled.
type CampaignItem struct {
	SN       string
	Outcome  Outcome
	RID      codec.ID  // the change started (0 if none)
	Deadline time.Time // of that change
	Reason   string    // why it failed, for OutcomeFailed (never a secret)
	Updated  time.Time
}

// CampaignStore is what a Store keeps of campaigns (every Store has it).
// Campaign records are written with check-and-set, like terminals; items
// are created or replaced by serial number.
type CampaignStore interface {
	// CreateCampaign stores a new campaign, or fails with ErrExists. It sets c.Version.
	CreateCampaign(ctx context.Context, c *Campaign) error
	// GetCampaign returns the campaign id, or ErrNotFound.
	GetCampaign(ctx context.Context, id string) (*Campaign, error)
	// UpdateCampaign replaces the campaign if its stored version still
	// equals c.Version: ErrConflict if it differs, ErrNotFound if it is
	// gone. On success it sets c.Version to the new version.
	UpdateCampaign(ctx context.Context, c *Campaign) error
	// ListCampaigns returns the ids of every campaign, sorted.
	ListCampaigns(ctx context.Context) ([]string, error)
	// PutCampaignItems creates or replaces items of campaign id (by SN).
	PutCampaignItems(ctx context.Context, id string, items []CampaignItem) error
	// ListCampaignItems returns up to limit items of campaign id with
	// serial numbers greater than after, sorted by serial number; limit <=
	// 0 means no limit.
	ListCampaignItems(ctx context.Context, id, after string, limit int) ([]CampaignItem, error)
}

// ValidateCampaignID reports whether id can name a campaign: 16 lower-case
// hex digits.
func ValidateCampaignID(id string) error {
	if len(id) != 16 {
		return fmt.Errorf("%w: campaign id: want 16 lower-case hex digits", ErrInvalid)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return fmt.Errorf("%w: campaign id: want 16 lower-case hex digits", ErrInvalid)
		}
	}
	return nil
}

// CampaignRequest asks for a campaign.
type CampaignRequest struct {
	Selection Selection
	What      codec.What
	Rate      float64 // changes started per second, > 0
}

// CreateCampaign validates r and stores a new running campaign with a
// random id. A list selection is sorted and its duplicates dropped.
func (s *Service) CreateCampaign(ctx context.Context, r CampaignRequest) (*Campaign, error) {
	sel, err := checkCampaign(r)
	if err != nil {
		return nil, fmt.Errorf("keysvc: create campaign: %w", err)
	}
	var b [8]byte
	if _, err := s.rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("keysvc: create campaign: random: %w", err)
	}
	if binary.BigEndian.Uint64(b[:]) == 0 {
		b[7] = 1
	}
	now := s.now1()
	c := &Campaign{ID: hex.EncodeToString(b[:]), Selection: sel, What: r.What, Rate: r.Rate,
		State: CampaignRunning, Created: now, Updated: now}
	if err := s.store.CreateCampaign(ctx, c); err != nil {
		return nil, fmt.Errorf("keysvc: create campaign: %w", err)
	}
	return c, nil
}

func checkCampaign(r CampaignRequest) (Selection, error) {
	sel := r.Selection
	switch r.What {
	case codec.WhatPwd, codec.WhatBK, codec.WhatAll:
	default:
		return sel, fmt.Errorf("%w: what: want pwd, bk or all", ErrInvalid)
	}
	if !(r.Rate > 0) || r.Rate > 1e6 {
		return sel, fmt.Errorf("%w: rate: want changes per second above 0", ErrInvalid)
	}
	switch sel.Kind {
	case SelectAll:
	case SelectExpiring:
		if sel.Before.IsZero() {
			return sel, fmt.Errorf("%w: selection: expiring needs a date (before)", ErrInvalid)
		}
		sel.Before = sel.Before.UTC().Truncate(time.Second)
	case SelectStatus:
		if sel.Status != StatusActive && sel.Status != StatusDisabled {
			return sel, fmt.Errorf("%w: selection: status: want active or disabled", ErrInvalid)
		}
	case SelectList:
		if len(sel.SNs) == 0 || len(sel.SNs) > MaxCampaignList {
			return sel, fmt.Errorf("%w: selection: list: want 1 to %d serial numbers", ErrInvalid, MaxCampaignList)
		}
		for _, sn := range sel.SNs {
			if codec.ValidateSN(sn) != nil {
				return sel, fmt.Errorf("%w: selection: list: %s is not a serial number (1 to 16 of [A-Za-z0-9])", ErrInvalid, safeSN(sn))
			}
		}
		sel.SNs = slices.Compact(slices.Sorted(slices.Values(sel.SNs)))
	default:
		return sel, fmt.Errorf("%w: selection: want all, expiring, list or status", ErrInvalid)
	}
	return sel, nil
}

// GetCampaign returns a campaign.
func (s *Service) GetCampaign(ctx context.Context, id string) (*Campaign, error) {
	if err := ValidateCampaignID(id); err != nil {
		return nil, fmt.Errorf("keysvc: get campaign: %w", err)
	}
	c, err := s.store.GetCampaign(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("keysvc: get campaign %s: %w", id, err)
	}
	return c, nil
}

// ListCampaigns returns the ids of every campaign, sorted.
func (s *Service) ListCampaigns(ctx context.Context) ([]string, error) {
	ids, err := s.store.ListCampaigns(ctx)
	if err != nil {
		return nil, fmt.Errorf("keysvc: list campaigns: %w", err)
	}
	return ids, nil
}

// UpdateCampaign applies fn to the stored campaign id and writes it back
// with check-and-set, retrying fn on a lost race; fn returning an error
// writes nothing.
func (s *Service) UpdateCampaign(ctx context.Context, id string, fn func(*Campaign) error) (*Campaign, error) {
	if err := ValidateCampaignID(id); err != nil {
		return nil, fmt.Errorf("keysvc: update campaign: %w", err)
	}
	for range maxAttempts {
		cur, err := s.store.GetCampaign(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("keysvc: update campaign %s: %w", id, err)
		}
		c := cur.Clone()
		if err := fn(c); err != nil {
			return nil, fmt.Errorf("keysvc: update campaign %s: %w", id, err)
		}
		c.Updated = s.now1()
		err = s.store.UpdateCampaign(ctx, c)
		if errors.Is(err, ErrConflict) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("keysvc: update campaign %s: %w", id, err)
		}
		return c, nil
	}
	return nil, fmt.Errorf("keysvc: update campaign %s: %w: gave up after %d attempts", id, ErrConflict, maxAttempts)
}

// SaveCampaign writes c with check-and-set on c.Version (ErrConflict if
// the stored campaign changed since it was read).
func (s *Service) SaveCampaign(ctx context.Context, c *Campaign) error {
	c.Updated = s.now1()
	if err := s.store.UpdateCampaign(ctx, c); err != nil {
		return fmt.Errorf("keysvc: save campaign %s: %w", c.ID, err)
	}
	return nil
}

// PutCampaignItems creates or replaces items of campaign id.
func (s *Service) PutCampaignItems(ctx context.Context, id string, items []CampaignItem) error {
	if len(items) == 0 {
		return nil
	}
	if err := s.store.PutCampaignItems(ctx, id, items); err != nil {
		return fmt.Errorf("keysvc: save items of campaign %s: %w", id, err)
	}
	return nil
}

// CampaignItems returns up to limit items of campaign id after the serial
// number after, sorted (limit <= 0: all).
func (s *Service) CampaignItems(ctx context.Context, id, after string, limit int) ([]CampaignItem, error) {
	items, err := s.store.ListCampaignItems(ctx, id, after, limit)
	if err != nil {
		return nil, fmt.Errorf("keysvc: items of campaign %s: %w", id, err)
	}
	return items, nil
}

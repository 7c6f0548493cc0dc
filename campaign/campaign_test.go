package campaign_test

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/campaign"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

// newService returns a key service on a fresh embedded store in dir.
func newService(tb testing.TB, dir string) *keysvc.Service {
	tb.Helper()
	key := make([]byte, boltstore.MasterKeySize)
	rand.Read(key)
	store, err := boltstore.Open(filepath.Join(dir, "m2mguard.db"), boltstore.Options{MasterKey: key})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { store.Close() })
	svc, err := keysvc.New(keysvc.Options{Store: store})
	if err != nil {
		tb.Fatal(err)
	}
	return svc
}

// starter starts changes in the key service as the hook does for an
// operator (no terminal is online: none is delivered) and counts the
// starts per terminal.
type starter struct {
	svc   *keysvc.Service
	mu    sync.Mutex
	calls map[string]int
}

func (s *starter) StartChange(ctx context.Context, sn string, what codec.What) (*keysvc.Change, error) {
	s.mu.Lock()
	if s.calls == nil {
		s.calls = map[string]int{}
	}
	s.calls[sn]++
	s.mu.Unlock()
	return s.svc.StartChange(ctx, sn, keysvc.ChangeRequest{What: what, Mode: codec.ModeCipher, Origin: keysvc.OriginOperator})
}

func (s *starter) started(sn string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[sn]
}

func register(t *testing.T, svc *keysvc.Service, n int) []string {
	t.Helper()
	var sns []string
	for i := range n {
		sn := fmt.Sprintf("T%02d", i)
		if _, err := svc.Register(context.Background(), keysvc.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120"}); err != nil {
			t.Fatal(err)
		}
		sns = append(sns, sn)
	}
	return sns
}

func newRunner(t *testing.T, svc *keysvc.Service, st campaign.Starter) *campaign.Runner {
	t.Helper()
	r, err := campaign.New(campaign.Options{Keys: svc, Starter: st, MaxRate: 1000, FlushEvery: 10 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	r.Start()
	t.Cleanup(r.Close)
	return r
}

// waitCampaign polls the campaign until cond holds.
func waitCampaign(t *testing.T, r *campaign.Runner, id string, what string, cond func(*keysvc.Campaign) bool) *keysvc.Campaign {
	t.Helper()
	var c *keysvc.Campaign
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if c, err = r.Get(context.Background(), id); err != nil {
			t.Fatal(err)
		}
		if cond(c) {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %+v", what, c)
		}
	}
}

// changeEvent is the hook's event of kind for the pending change of sn.
func changeEvent(t *testing.T, svc *keysvc.Service, kind events.Kind, sn string) events.Event {
	t.Helper()
	term, err := svc.Get(context.Background(), sn)
	if err != nil || term.Pending == nil {
		t.Fatalf("%s: no pending change (%v)", sn, err)
	}
	e := events.New(kind, sn, time.Now())
	e.RID = term.Pending.RID.String()
	return e
}

// TestCampaignOutcomes: a campaign over every terminal starts one change
// for each active terminal without a pending change, counts the busy and
// the disabled ones as skipped, follows the changes through the hook's
// events, and a new runner on the same store (a restart) goes on with the
// same counts and follows the changes still open; no terminal is started
// twice.
func TestCampaignOutcomes(t *testing.T) {
	ctx := context.Background()
	svc := newService(t, t.TempDir())
	sns := register(t, svc, 12)
	if _, err := svc.SetStatus(ctx, "T03", keysvc.StatusDisabled); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.StartChange(ctx, "T05", keysvc.ChangeRequest{What: codec.WhatBK, Mode: codec.ModeCipher, Origin: keysvc.OriginTerminal}); err != nil {
		t.Fatal(err)
	}
	st := &starter{svc: svc}
	r := newRunner(t, svc, st)
	c, err := r.Create(ctx, keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectAll}, What: codec.WhatPwd, Rate: 1000})
	if err != nil {
		t.Fatal(err)
	}
	c = waitCampaign(t, r, c.ID, "not tracking", func(c *keysvc.Campaign) bool { return c.State == keysvc.CampaignTracking })
	if want := (keysvc.CampaignCounts{Waiting: 10, Busy: 1, Inactive: 1}); c.Counts != want || c.Cursor != "T11" {
		t.Fatalf("counts %+v cursor %q, want %+v and T11", c.Counts, c.Cursor, want)
	}

	// The hook's events move the changes on.
	committed := changeEvent(t, svc, events.ChangeCommitted, "T00")
	rid, _ := codec.ParseID(committed.RID)
	if _, err := svc.CommitChange(ctx, "T00", rid); err != nil {
		t.Fatal(err)
	}
	r.Emit(committed)
	r.Emit(changeEvent(t, svc, events.ChangeDelivered, "T01"))
	r.Emit(changeEvent(t, svc, events.ChangeExpired, "T02"))
	r.Emit(changeEvent(t, svc, events.ChangeCommitted, "T05")) // not the campaign's change: ignored
	want := keysvc.CampaignCounts{Waiting: 7, Delivered: 1, Committed: 1, Expired: 1, Busy: 1, Inactive: 1}
	waitCampaign(t, r, c.ID, "events not counted", func(c *keysvc.Campaign) bool { return c.Counts == want })
	items, next, err := r.Items(ctx, c.ID, keysvc.OutcomeWaiting, "", 100)
	if err != nil || next != "" {
		t.Fatal(err, next)
	}
	var waiting []string
	for _, it := range items {
		waiting = append(waiting, it.SN)
	}
	if !slices.Equal(waiting, []string{"T04", "T06", "T07", "T08", "T09", "T10", "T11"}) {
		t.Fatalf("waiting %v", waiting)
	}

	// A restart: a new runner on the same store.
	r.Close()
	r2 := newRunner(t, svc, st)
	waitCampaign(t, r2, c.ID, "not resumed with its counts", func(c *keysvc.Campaign) bool {
		return c.Counts == want && c.State == keysvc.CampaignTracking
	})
	// The hook commits in the store, then emits: an event that comes
	// before the new runner has loaded the campaign is made up for by the
	// record, which the runner reads for every change it resumes.
	commit := changeEvent(t, svc, events.ChangeCommitted, "T04")
	rid, _ = codec.ParseID(commit.RID)
	if _, err := svc.CommitChange(ctx, "T04", rid); err != nil {
		t.Fatal(err)
	}
	r2.Emit(commit)
	want.Waiting, want.Committed = 6, 2
	waitCampaign(t, r2, c.ID, "an event after the restart not counted", func(c *keysvc.Campaign) bool { return c.Counts == want })
	for _, sn := range sns {
		if n := st.started(sn); n != 1 {
			t.Errorf("%s: started %d times, want 1", sn, n)
		}
	}
}

// TestCampaignLimits: a rate above MaxRate is refused; one campaign at a
// time starts changes; a cancelled campaign starts no more and records
// the terminals it had queued as failed; a finished campaign cannot be
// cancelled; a list naming a deleted terminal records it as failed.
func TestCampaignLimits(t *testing.T) {
	ctx := context.Background()
	svc := newService(t, t.TempDir())
	register(t, svc, 12)
	st := &starter{svc: svc}
	r := newRunner(t, svc, st)
	all := keysvc.Selection{Kind: keysvc.SelectAll}
	if _, err := r.Create(ctx, keysvc.CampaignRequest{Selection: all, What: codec.WhatPwd, Rate: 1001}); !errors.Is(err, campaign.ErrRate) {
		t.Fatalf("rate above the maximum: %v", err)
	}
	slow, err := r.Create(ctx, keysvc.CampaignRequest{Selection: all, What: codec.WhatPwd, Rate: 2})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Create(ctx, keysvc.CampaignRequest{Selection: all, What: codec.WhatBK, Rate: 2}); !errors.Is(err, campaign.ErrRunning) {
		t.Fatalf("a second campaign while one runs: %v", err)
	}
	waitCampaign(t, r, slow.ID, "no change started", func(c *keysvc.Campaign) bool { return c.Counts.Handled() >= 1 })
	if c, err := r.Cancel(ctx, slow.ID); err != nil || c.State != keysvc.CampaignCancelled {
		t.Fatalf("cancel: %v %+v", err, c)
	}
	c := waitCampaign(t, r, slow.ID, "the cancelled campaign did not settle its queue", func(c *keysvc.Campaign) bool {
		return c.Counts.Handled() == 2 // its first batch (rate 2: two terminals), started or recorded as not started
	})
	r.Close() // writes what it holds; a walk going on after the cancel would have started more
	total := 0
	for i := range 12 {
		total += st.started(fmt.Sprintf("T%02d", i))
	}
	if c.Counts.Waiting+c.Counts.Failed != 2 || total != c.Counts.Waiting || st.started("T02") != 0 {
		t.Fatalf("after the cancel: %+v, %d changes started", c.Counts, total)
	}
	r = newRunner(t, svc, st)
	if c, err := r.Cancel(ctx, slow.ID); err != nil || c.State != keysvc.CampaignCancelled {
		t.Fatalf("cancelling a cancelled campaign: %v %+v", err, c)
	}

	// A list with a terminal deleted meanwhile.
	if err := svc.Delete(ctx, "T11"); err != nil {
		t.Fatal(err)
	}
	list, err := r.Create(ctx, keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectList, SNs: []string{"T11"}}, What: codec.WhatAll, Rate: 10})
	if err != nil {
		t.Fatal(err)
	}
	c = waitCampaign(t, r, list.ID, "the list campaign did not finish", func(c *keysvc.Campaign) bool { return c.State == keysvc.CampaignDone })
	if c.Counts != (keysvc.CampaignCounts{Failed: 1}) {
		t.Fatalf("counts %+v", c.Counts)
	}
	items, _, err := r.Items(ctx, list.ID, "", "", 10)
	if err != nil || len(items) != 1 || items[0].Reason != "deleted" {
		t.Fatalf("items %+v, %v", items, err)
	}
	if _, err := r.Cancel(ctx, list.ID); !errors.Is(err, campaign.ErrFinished) {
		t.Fatalf("cancel of a finished campaign: %v", err)
	}
}

// Example: a campaign changing the passwords of every terminal. In the
// broker, the hook is the Starter and the runner gets the hook's events
// (it is an events.Sink); here no terminal is online, so every change
// waits for its terminal's next login.
func Example() {
	ctx := context.Background()
	key := make([]byte, boltstore.MasterKeySize)
	rand.Read(key)
	tmp, _ := os.MkdirTemp("", "campaign-example")
	defer os.RemoveAll(tmp)
	store, _ := boltstore.Open(filepath.Join(tmp, "m2mguard.db"), boltstore.Options{MasterKey: key})
	defer store.Close()
	svc, _ := keysvc.New(keysvc.Options{Store: store})
	for _, sn := range []string{"A1", "A2", "A3"} {
		svc.Register(ctx, keysvc.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120"})
	}
	r, _ := campaign.New(campaign.Options{Keys: svc, Starter: &starter{svc: svc}, Logger: slog.New(slog.DiscardHandler)})
	r.Start()
	defer r.Close()
	c, _ := r.Create(ctx, keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectAll}, What: codec.WhatPwd, Rate: 100})
	for c.Counts.Handled() < 3 {
		time.Sleep(10 * time.Millisecond)
		c, _ = r.Get(ctx, c.ID)
	}
	fmt.Printf("handled %d: %d waiting\n", c.Counts.Handled(), c.Counts.Waiting)
	// Output: handled 3: 3 waiting
}

// TestCampaignExpiryWithoutEvent: a change whose terminal never came back
// is settled as expired once past its deadline, from the terminal's
// record, with no event (the hook's expiry watch does not outlive a
// restart); the campaign is then done.
func TestCampaignExpiryWithoutEvent(t *testing.T) {
	ctx := context.Background()
	var offset atomic.Int64
	now := func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	svc := newService(t, t.TempDir())
	register(t, svc, 3)
	r, err := campaign.New(campaign.Options{Keys: svc, Starter: &starter{svc: svc}, FlushEvery: 10 * time.Millisecond,
		CheckEvery: 10 * time.Millisecond, Now: now, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	r.Start()
	defer r.Close()
	c, err := r.Create(ctx, keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectAll}, What: codec.WhatAll, Rate: 100})
	if err != nil {
		t.Fatal(err)
	}
	waitCampaign(t, r, c.ID, "not tracking", func(c *keysvc.Campaign) bool {
		return c.State == keysvc.CampaignTracking && c.Counts.Waiting == 3
	})
	offset.Store(int64(25 * time.Hour)) // past the deadline (24 h) and the minute the runner leaves the hook
	c = waitCampaign(t, r, c.ID, "not settled as expired", func(c *keysvc.Campaign) bool { return c.Counts.Expired == 3 })
	stored := waitCampaign(t, r, c.ID, "not done", func(c *keysvc.Campaign) bool { return c.State == keysvc.CampaignDone && !c.Finished.IsZero() })
	if stored.Counts != (keysvc.CampaignCounts{Expired: 3}) {
		t.Fatalf("counts %+v", stored.Counts)
	}
}

// TestItemsBeforeTheyAreWritten: a campaign's counts live in memory and
// its items are written every FlushEvery; the items the counts count are
// listed at once, also before they are written. Before, a list campaign
// reported done with one failed terminal while Items returned nothing
// (seen with a caller polling every millisecond).
func TestItemsBeforeTheyAreWritten(t *testing.T) {
	ctx := t.Context()
	svc := newService(t, t.TempDir())
	register(t, svc, 3)
	r, err := campaign.New(campaign.Options{Keys: svc, Starter: &starter{svc: svc}, MaxRate: 1000, FlushEvery: time.Hour,
		Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	r.Start()
	defer r.Close()
	if err := svc.Delete(ctx, "T01"); err != nil {
		t.Fatal(err)
	}
	c, err := r.Create(ctx, keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectList, SNs: []string{"T00", "T01", "T02"}},
		What: codec.WhatPwd, Rate: 1000})
	if err != nil {
		t.Fatal(err)
	}
	got := waitCampaign(t, r, c.ID, "three terminals handled", func(c *keysvc.Campaign) bool { return c.Counts.Handled() == 3 })
	items, next, err := r.Items(ctx, c.ID, "", "", 10)
	if err != nil || next != "" || len(items) != 3 || items[0].SN != "T00" || items[1].SN != "T01" || items[1].Reason != "deleted" || items[2].SN != "T02" {
		t.Fatalf("counts %+v; items %+v (next %q, %v)", got.Counts, items, next, err)
	}
	if failed, _, _ := r.Items(ctx, c.ID, keysvc.OutcomeFailed, "", 10); len(failed) != 1 || failed[0].SN != "T01" {
		t.Fatalf("failed items %+v", failed)
	}
	if page, next, _ := r.Items(ctx, c.ID, "", "T00", 1); len(page) != 1 || page[0].SN != "T01" || next != "T01" {
		t.Fatalf("a page of one after T0: %+v, next %q", page, next)
	}
}

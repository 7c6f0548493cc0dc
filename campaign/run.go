package campaign

import (
	"context"
	"errors"
	"math"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/m2mguard/m2mguard/events"
	"github.com/m2mguard/m2mguard/keysvc"
)

// itemKey names a change a campaign follows: the terminal and the rid, as
// the hook's events carry them.
type itemKey struct{ sn, rid string }

// tracked is a change a campaign started and follows.
type tracked struct {
	run  *run
	item keysvc.CampaignItem
}

// run is a campaign this runner starts changes for or follows. c, cDirty,
// dirty and tracking are guarded by Runner.mu; the rest belongs to the
// runner's goroutine.
type run struct {
	c        *keysvc.Campaign               // the live record: state, cursor, counts
	cDirty   bool                           // c changed since it was written
	dirty    map[string]keysvc.CampaignItem // items changed since they were written, by sn
	tracking map[string]*tracked            // changes not committed or expired yet, by sn

	queue    []*keysvc.Terminal             // terminals whose intent is written, in order, to start
	intents  map[string]keysvc.CampaignItem // the intents of queue, by sn
	known    map[string]keysvc.CampaignItem // a resumed campaign's items beyond its cursor, by sn
	fetched  string                         // the last serial number read from the selection
	walked   bool                           // the selection is read to its end
	nextAt   time.Time                      // when the next change may start
	interval time.Duration                  // 1 / rate
}

func newRun(c *keysvc.Campaign, now time.Time) *run {
	a := &run{c: c, dirty: map[string]keysvc.CampaignItem{}, tracking: map[string]*tracked{},
		intents: map[string]keysvc.CampaignItem{}, known: map[string]keysvc.CampaignItem{},
		fetched: c.Cursor, nextAt: now}
	a.interval = time.Duration(float64(time.Second) / c.Rate)
	if c.State != keysvc.CampaignRunning {
		a.walked = true
	}
	return a
}

// batch is how many terminals are read (and their intents written) at
// once: about a second's worth of starts.
func (a *run) batch() int {
	return int(max(1, min(maxBatch, math.Ceil(a.c.Rate))))
}

// finished reports whether the campaign has nothing left to do.
func (a *run) finished() bool {
	return a.walked && len(a.queue) == 0 && len(a.tracking) == 0
}

func (r *Runner) now1() time.Time { return r.opts.Now().UTC().Truncate(time.Second) }

func (r *Runner) storeCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, r.opts.StoreTimeout)
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// loop holds the lease and serves while it does, until Close.
func (r *Runner) loop() {
	defer close(r.done)
	for r.ctx.Err() == nil {
		held, err := r.opts.Lease.Hold(r.ctx)
		if err != nil {
			if r.ctx.Err() == nil {
				r.log.Warn("campaign lease not taken", "err", err.Error())
				sleep(r.ctx, r.opts.RetryAfter)
			}
			continue
		}
		r.serve(held)
	}
}

// serve resumes the stored campaigns and runs them until ctx ends (Close,
// or the lease is lost); then it writes what it holds and forgets them.
func (r *Runner) serve(ctx context.Context) {
	defer r.unserve()
	if err := r.load(ctx); err != nil {
		r.log.Warn("campaigns not resumed; trying again", "err", err.Error())
		sleep(ctx, r.opts.RetryAfter)
		return
	}
	flush := time.NewTicker(r.opts.FlushEvery)
	defer flush.Stop()
	check := time.NewTicker(r.opts.CheckEvery)
	defer check.Stop()
	next := time.NewTimer(time.Hour)
	defer next.Stop()
	for {
		var fire <-chan time.Time
		if at, ok := r.nextStart(); ok {
			next.Reset(max(0, time.Until(at)))
			fire = next.C
		}
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-flush.C:
			r.flush(ctx)
		case <-check.C:
			r.reconcileDue(ctx)
			r.loadNew(ctx)
		case <-fire:
			r.step(ctx)
		}
	}
}

// unserve writes what is held in memory, with a fresh context (the one
// served has ended), and forgets the campaigns.
func (r *Runner) unserve() {
	ctx, cancel := context.WithTimeout(context.Background(), r.opts.StoreTimeout)
	defer cancel()
	r.flush(ctx)
	r.mu.Lock()
	r.serving = false
	r.active = map[string]*run{}
	r.outstanding = map[itemKey]*tracked{}
	r.mu.Unlock()
}

// running returns the campaign that starts changes (at most one), if any.
func (r *Runner) running() *run {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.active {
		if a.c.State == keysvc.CampaignRunning && !a.walked {
			return a
		}
	}
	return nil
}

// nextStart returns when the running campaign may start its next change.
func (r *Runner) nextStart() (time.Time, bool) {
	a := r.running()
	if a == nil {
		return time.Time{}, false
	}
	return a.nextAt, true
}

// step starts the next change of the running campaign, reading its
// selection on as needed (terminals outside the selection cost no time).
func (r *Runner) step(ctx context.Context) {
	a := r.running()
	if a == nil {
		return
	}
	for range 100 { // pages without a terminal to start: yield now and then
		if len(a.queue) == 0 {
			if a.walked {
				return
			}
			if !r.fetch(ctx, a) {
				a.nextAt = r.opts.Now().Add(r.opts.RetryAfter)
				return
			}
			continue
		}
		if !r.startOne(ctx, a, a.queue[0]) {
			a.nextAt = r.opts.Now().Add(r.opts.RetryAfter)
			return
		}
		a.queue = a.queue[1:]
		a.nextAt = r.opts.Now().Add(a.interval)
		return
	}
	a.nextAt = r.opts.Now()
}

// fetch reads the next batch of the selection, writes an intent for each
// terminal to start, and queues them. A resumed campaign's items beyond
// its cursor are not handled again; for an intent alone it looks at the
// record first (resolve). It reports false if the store failed.
func (r *Runner) fetch(ctx context.Context, a *run) bool {
	sctx, cancel := r.storeCtx(ctx)
	defer cancel()
	page, missing, last, err := r.page(sctx, a)
	if err != nil {
		r.log.Warn("campaign: reading the selection failed; trying again", "campaign", a.c.ID, "err", err.Error())
		return false
	}
	now := r.now1()
	if last == "" {
		a.walked = true
		r.settleLeftovers(sctx, a)
		r.mu.Lock()
		if a.fetched != "" {
			a.c.Cursor, a.cDirty = a.fetched, true
		}
		r.mu.Unlock()
		return true
	}
	var intents, handled []keysvc.CampaignItem
	var queue []*keysvc.Terminal
	for _, t := range page {
		if it, ok := a.known[t.SN]; ok {
			delete(a.known, t.SN)
			if it.Outcome != keysvc.OutcomeStarting {
				continue // handled before the restart, counted from its item
			}
			if res, ok := r.resolve(a, t, it, true); ok {
				handled = append(handled, res)
				continue
			}
			// Nothing happened after that intent: start it now, with a
			// new one (it was selected then, it stays selected).
		} else if !a.c.Selection.Matches(t, a.c.What) {
			continue
		}
		intent := keysvc.CampaignItem{SN: t.SN, Outcome: keysvc.OutcomeStarting, RID: t.LastCommitted, Updated: now}
		intents = append(intents, intent)
		queue = append(queue, t)
	}
	for _, sn := range missing {
		delete(a.known, sn)
		handled = append(handled, keysvc.CampaignItem{SN: sn, Outcome: keysvc.OutcomeFailed, Reason: "deleted", Updated: now})
	}
	if err := r.keys.PutCampaignItems(sctx, a.c.ID, intents); err != nil {
		r.log.Warn("campaign: writing intents failed; trying again", "campaign", a.c.ID, "err", err.Error())
		return false
	}
	r.mu.Lock()
	var follow []*tracked
	for _, it := range handled {
		if tr := r.recordLocked(a, it); tr != nil {
			follow = append(follow, tr)
		}
	}
	if len(queue) == 0 {
		a.c.Cursor, a.cDirty = last, true
	}
	r.mu.Unlock()
	// A change resolved from the record may have moved on between that
	// read and now, when events for it count: read its record again.
	r.reconcile(ctx, follow)
	for _, it := range intents {
		a.intents[it.SN] = it
	}
	a.queue, a.fetched = queue, last
	return true
}

// page reads the next batch of the selection after a.fetched: the
// terminals found, the serial numbers of a list that no longer exist, and
// the last serial number read ("" at the end).
func (r *Runner) page(ctx context.Context, a *run) (page []*keysvc.Terminal, missing []string, last string, err error) {
	n := a.batch()
	if a.c.Selection.Kind != keysvc.SelectList {
		page, _, err = r.keys.List(ctx, a.fetched, n)
		if err != nil || len(page) == 0 {
			return nil, nil, "", err
		}
		return page, nil, page[len(page)-1].SN, nil
	}
	sns := a.c.Selection.SNs
	i := sort.SearchStrings(sns, a.fetched)
	if i < len(sns) && sns[i] == a.fetched {
		i++
	}
	sns = sns[i:min(i+n, len(sns))]
	for _, sn := range sns {
		t, err := r.keys.Get(ctx, sn)
		switch {
		case errors.Is(err, keysvc.ErrNotFound):
			missing = append(missing, sn)
		case err != nil:
			return nil, nil, "", err
		default:
			page = append(page, t)
		}
	}
	if len(sns) == 0 {
		return nil, nil, "", nil
	}
	return page, missing, sns[len(sns)-1], nil
}

// settleLeftovers handles the intents of a resumed campaign that its walk
// did not meet again (the terminal was deleted since): each is looked up
// once more and recorded as what happened.
func (r *Runner) settleLeftovers(ctx context.Context, a *run) {
	for sn, it := range a.known {
		delete(a.known, sn)
		if it.Outcome != keysvc.OutcomeStarting {
			continue
		}
		out := keysvc.CampaignItem{SN: sn, Outcome: keysvc.OutcomeFailed, Reason: "deleted", Updated: r.now1()}
		if t, err := r.keys.Get(ctx, sn); err == nil {
			if res, ok := r.resolve(a, t, it, true); ok {
				out = res
			} else {
				out.Reason = "left the selection"
			}
		}
		r.mu.Lock()
		tr := r.recordLocked(a, out)
		r.mu.Unlock()
		if tr != nil { // as in fetch: it may have moved on since the read
			r.reconcile(ctx, []*tracked{tr})
		}
	}
}

// resolve finds out, from a terminal's record, whether the change an
// intent announced has started: a change pending that an operator (the
// campaign is one) started for the same credentials no sooner than the
// intent is taken as the campaign's; with committed, a terminal whose last
// committed change is not the one the intent saw has had its change
// (committed since). It reports false if no change happened.
func (r *Runner) resolve(a *run, t *keysvc.Terminal, intent keysvc.CampaignItem, committed bool) (keysvc.CampaignItem, bool) {
	now := r.opts.Now()
	out := keysvc.CampaignItem{SN: t.SN, Updated: r.now1()}
	if p := t.Pending; p != nil && !p.Expired(now) && p.Origin == keysvc.OriginOperator && p.What == a.c.What && !p.Started.Before(intent.Updated) {
		out.RID, out.Deadline, out.Outcome = p.RID, p.Deadline, keysvc.OutcomeWaiting
		if p.Delivered {
			out.Outcome = keysvc.OutcomeDelivered
		}
		r.log.Info("campaign: the change pending is the campaign's", "campaign", a.c.ID, "sn", t.SN, "rid", p.RID.String())
		return out, true
	}
	if committed && t.LastCommitted != 0 && t.LastCommitted != intent.RID {
		out.RID, out.Outcome = t.LastCommitted, keysvc.OutcomeCommitted
		r.log.Info("campaign: the change was committed before the restart", "campaign", a.c.ID, "sn", t.SN, "rid", t.LastCommitted.String())
		return out, true
	}
	return out, false
}

// transient reports whether a failure is worth trying again later: the
// store was unavailable, slow, or busy with concurrent writes.
func transient(err error) bool {
	return errors.Is(err, keysvc.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, keysvc.ErrConflict)
}

// startOne starts the change of t through the hook and records the
// outcome. It reports false (nothing recorded) if it is worth trying
// again later.
func (r *Runner) startOne(ctx context.Context, a *run, t *keysvc.Terminal) bool {
	r.mu.Lock()
	if a.c.State != keysvc.CampaignRunning {
		r.mu.Unlock()
		return false // cancelled: settleLocked records the queue
	}
	r.starting, r.early = t.SN, nil
	r.mu.Unlock()

	sctx, cancel := r.storeCtx(ctx)
	defer cancel()
	ch, err := r.opts.Starter.StartChange(sctx, t.SN, a.c.What)
	item := keysvc.CampaignItem{SN: t.SN, Updated: r.now1()}
	switch {
	case err == nil:
		item.RID, item.Deadline, item.Outcome = ch.RID, ch.Deadline, keysvc.OutcomeWaiting
		if ch.Delivered {
			item.Outcome = keysvc.OutcomeDelivered
		}
	case errors.Is(err, keysvc.ErrBusy):
		item.Outcome = keysvc.OutcomeBusy
		// A change started after the intent is the campaign's own (one
		// that began before a restart and whose intent is all that was
		// written); one started before it is another's.
		if cur, gerr := r.keys.Get(sctx, t.SN); gerr == nil {
			if res, ok := r.resolve(a, cur, a.intents[t.SN], false); ok {
				item = res
			}
		}
	case errors.Is(err, keysvc.ErrInactive):
		item.Outcome = keysvc.OutcomeInactive
	case errors.Is(err, keysvc.ErrNotFound):
		item.Outcome, item.Reason = keysvc.OutcomeFailed, "deleted"
	case transient(err) && ctx.Err() == nil:
		r.mu.Lock()
		r.starting, r.early = "", nil
		r.mu.Unlock()
		r.log.Warn("campaign: starting a change failed; trying again", "campaign", a.c.ID, "sn", t.SN, "err", err.Error())
		return false
	default:
		item.Outcome, item.Reason = keysvc.OutcomeFailed, clip("start failed: "+err.Error())
	}
	delete(a.intents, t.SN)

	r.mu.Lock()
	defer r.mu.Unlock()
	early := r.early
	r.starting, r.early = "", nil
	r.recordLocked(a, item)
	if len(a.queue) > 1 {
		a.c.Cursor = t.SN
	} else {
		a.c.Cursor = a.fetched // the rest of the batch was outside the selection
	}
	for _, e := range early {
		r.applyLocked(e)
	}
	return true
}

// clip bounds a reason stored in an item.
func clip(s string) string {
	if len(s) > 200 {
		return s[:200]
	}
	return s
}

// recordLocked counts a terminal handled and keeps its item to write; a
// change not yet committed or expired is followed, and returned.
func (r *Runner) recordLocked(a *run, it keysvc.CampaignItem) *tracked {
	a.c.Counts.Add(it.Outcome, 1)
	a.cDirty = true
	a.dirty[it.SN] = it
	if it.Outcome.Final() {
		return nil
	}
	tr := &tracked{run: a, item: it}
	r.outstanding[itemKey{it.SN, it.RID.String()}] = tr
	a.tracking[it.SN] = tr
	return tr
}

// Emit follows the hook's change events (events.Sink): a change a
// campaign started moves on to delivered, committed or expired. It never
// blocks on anything but the runner's lock, which no store call holds.
func (r *Runner) Emit(e events.Event) {
	switch e.Kind {
	case events.ChangeDelivered, events.ChangeCommitted, events.ChangeExpired:
	default:
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if e.SN != "" && e.SN == r.starting {
		if len(r.early) < 16 {
			r.early = append(r.early, e) // applied once the start has returned the rid
		}
		return
	}
	r.applyLocked(e)
}

func (r *Runner) applyLocked(e events.Event) {
	tr := r.outstanding[itemKey{e.SN, e.RID}]
	if tr == nil {
		return
	}
	switch e.Kind {
	case events.ChangeDelivered:
		if tr.item.Outcome == keysvc.OutcomeWaiting {
			r.moveLocked(tr, keysvc.OutcomeDelivered)
		}
	case events.ChangeCommitted:
		r.moveLocked(tr, keysvc.OutcomeCommitted)
	case events.ChangeExpired:
		r.moveLocked(tr, keysvc.OutcomeExpired)
	}
}

// moveLocked gives a followed change its new outcome.
func (r *Runner) moveLocked(tr *tracked, to keysvc.Outcome) {
	a := tr.run
	a.c.Counts.Add(tr.item.Outcome, -1)
	a.c.Counts.Add(to, 1)
	a.cDirty = true
	tr.item.Outcome, tr.item.Updated = to, r.now1()
	a.dirty[tr.item.SN] = tr.item
	if to.Final() {
		delete(r.outstanding, itemKey{tr.item.SN, tr.item.RID.String()})
		delete(a.tracking, tr.item.SN)
		if a.finished() {
			r.signal()
		}
	}
}

// outcomeOf is the outcome of a change as a terminal's record shows it
// (t nil: the terminal is gone, and its change with it).
func outcomeOf(it keysvc.CampaignItem, t *keysvc.Terminal, now time.Time) keysvc.Outcome {
	switch {
	case t == nil:
		return keysvc.OutcomeExpired
	case t.LastCommitted == it.RID:
		return keysvc.OutcomeCommitted
	case t.Pending != nil && t.Pending.RID == it.RID && !t.Pending.Expired(now):
		if t.Pending.Delivered {
			return keysvc.OutcomeDelivered
		}
		return keysvc.OutcomeWaiting
	}
	return keysvc.OutcomeExpired // past its deadline, or cancelled (disable, rekey)
}

// reconcileDue looks up the changes past their deadline (with a minute for
// the hook's own expiry sweep) that no event has settled: the hook's
// expiry watch does not outlive a restart, and a change cancelled by a
// disable or rekey gives no event.
func (r *Runner) reconcileDue(ctx context.Context) {
	now := r.opts.Now()
	r.mu.Lock()
	var due []*tracked
	for _, tr := range r.outstanding {
		if now.After(tr.item.Deadline.Add(time.Minute)) {
			due = append(due, tr)
		}
	}
	r.mu.Unlock()
	r.reconcile(ctx, due)
}

// reconcile settles followed changes from the terminals' records.
func (r *Runner) reconcile(ctx context.Context, trs []*tracked) {
	now := r.opts.Now()
	for _, tr := range trs {
		sctx, cancel := r.storeCtx(ctx)
		t, err := r.keys.Get(sctx, tr.item.SN)
		cancel()
		if err != nil && !errors.Is(err, keysvc.ErrNotFound) {
			r.log.Warn("campaign: looking up a change failed", "sn", tr.item.SN, "err", err.Error())
			continue
		}
		if err != nil {
			t = nil
		}
		r.mu.Lock()
		if r.outstanding[itemKey{tr.item.SN, tr.item.RID.String()}] == tr {
			if to := outcomeOf(tr.item, t, now); to != tr.item.Outcome && !(to == keysvc.OutcomeWaiting && tr.item.Outcome == keysvc.OutcomeDelivered) {
				r.moveLocked(tr, to)
			}
		}
		r.mu.Unlock()
	}
}

// load resumes every campaign of the store that is not finished.
func (r *Runner) load(ctx context.Context) error {
	sctx, cancel := r.storeCtx(ctx)
	ids, err := r.keys.ListCampaigns(sctx)
	cancel()
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.serving = true
	r.mu.Unlock()
	for _, id := range ids {
		if err := r.resume(ctx, id); err != nil {
			return err
		}
	}
	return nil
}

// loadNew resumes campaigns created on other brokers since (a fleet).
func (r *Runner) loadNew(ctx context.Context) {
	sctx, cancel := r.storeCtx(ctx)
	ids, err := r.keys.ListCampaigns(sctx)
	cancel()
	if err != nil {
		return
	}
	for _, id := range ids {
		r.mu.Lock()
		_, ok := r.active[id]
		r.mu.Unlock()
		if !ok {
			if err := r.resume(ctx, id); err != nil {
				r.log.Warn("campaign not resumed", "campaign", id, "err", err.Error())
			}
		}
	}
}

// resume loads campaign id if it is not finished: its counts are counted
// again from its items (the record may lag them), its changes outstanding
// are looked up (events may have been missed while no broker followed
// them), and its walk goes on after its cursor.
func (r *Runner) resume(ctx context.Context, id string) error {
	sctx, cancel := r.storeCtx(ctx)
	c, err := r.keys.GetCampaign(sctx, id)
	cancel()
	if err != nil {
		return err
	}
	if c.State == keysvc.CampaignDone || !c.Finished.IsZero() {
		return nil
	}
	a := newRun(c, r.opts.Now())
	var counts keysvc.CampaignCounts
	var follow []*tracked
	after := ""
	for {
		sctx, cancel := r.storeCtx(ctx)
		items, err := r.keys.CampaignItems(sctx, id, after, itemPage)
		cancel()
		if err != nil {
			return err
		}
		for _, it := range items {
			if it.Outcome != keysvc.OutcomeStarting {
				counts.Add(it.Outcome, 1)
			}
			if it.SN > c.Cursor || it.Outcome == keysvc.OutcomeStarting {
				a.known[it.SN] = it
			}
			if it.Outcome == keysvc.OutcomeWaiting || it.Outcome == keysvc.OutcomeDelivered {
				// Followed: an intent (starting) is not a change; the
				// walk resolves it when it meets it again.
				follow = append(follow, &tracked{run: a, item: it})
			}
		}
		if len(items) < itemPage {
			break
		}
		after = items[len(items)-1].SN
	}
	a.c.Counts = counts
	r.mu.Lock()
	for _, tr := range follow {
		r.outstanding[itemKey{tr.item.SN, tr.item.RID.String()}] = tr
		a.tracking[tr.item.SN] = tr
	}
	r.active[id] = a
	r.mu.Unlock()
	r.reconcile(ctx, follow)
	if a.walked {
		// Not starting changes any more: intents it left are settled now.
		sctx, cancel := r.storeCtx(ctx)
		r.settleLeftovers(sctx, a)
		cancel()
	}
	r.log.Info("campaign resumed", "campaign", id, "state", string(c.State), "cursor", c.Cursor,
		"handled", counts.Handled(), "outstanding", len(follow))
	return nil
}

// flush writes the items and campaigns changed in memory (items first,
// then the campaign with its cursor: a cursor never runs ahead of the
// items written), after settling each campaign's state; a campaign that is
// finished and written is forgotten.
func (r *Runner) flush(ctx context.Context) {
	type write struct {
		a     *run
		c     *keysvc.Campaign
		items []keysvc.CampaignItem
	}
	var writes []write
	now := r.now1()
	r.mu.Lock()
	for _, a := range r.active {
		r.settleLocked(a, now)
		if !a.cDirty && len(a.dirty) == 0 {
			continue
		}
		w := write{a: a, c: a.c.Clone()}
		for _, it := range a.dirty {
			w.items = append(w.items, it)
		}
		slices.SortFunc(w.items, func(x, y keysvc.CampaignItem) int { return strings.Compare(x.SN, y.SN) })
		clear(a.dirty)
		a.cDirty = false
		writes = append(writes, w)
	}
	r.mu.Unlock()
	for _, w := range writes {
		sctx, cancel := r.storeCtx(ctx)
		err := r.keys.PutCampaignItems(sctx, w.c.ID, w.items)
		if err == nil {
			err = r.keys.SaveCampaign(sctx, w.c)
		}
		if errors.Is(err, keysvc.ErrConflict) {
			r.merge(sctx, w.a)
		}
		cancel()
		r.mu.Lock()
		if err != nil {
			for _, it := range w.items {
				if _, newer := w.a.dirty[it.SN]; !newer {
					w.a.dirty[it.SN] = it
				}
			}
			w.a.cDirty = true
			if !errors.Is(err, keysvc.ErrConflict) {
				r.log.Warn("campaign: writing progress failed; trying again", "campaign", w.c.ID, "err", err.Error())
			}
		} else {
			w.a.c.Version = w.c.Version
			if !w.c.Finished.IsZero() && !w.a.cDirty && len(w.a.dirty) == 0 {
				delete(r.active, w.c.ID)
				r.log.Info("campaign finished", "campaign", w.c.ID, "state", string(w.c.State),
					"committed", w.c.Counts.Committed, "expired", w.c.Counts.Expired, "busy", w.c.Counts.Busy,
					"inactive", w.c.Counts.Inactive, "failed", w.c.Counts.Failed)
			}
		}
		r.mu.Unlock()
	}
}

// settleLocked moves a campaign on: a running one whose selection is read
// to its end is tracking; one with nothing left to follow is done (or
// stays cancelled) and finished. A cancelled campaign's intents not
// started are recorded as failed.
func (r *Runner) settleLocked(a *run, now time.Time) {
	if a.c.State == keysvc.CampaignCancelled && !a.walked {
		a.walked = true
		for _, t := range a.queue {
			r.recordLocked(a, keysvc.CampaignItem{SN: t.SN, Outcome: keysvc.OutcomeFailed, Reason: "not started: campaign cancelled", Updated: now})
		}
		a.queue = nil
		clear(a.intents)
	}
	if a.c.State == keysvc.CampaignRunning && a.walked && len(a.queue) == 0 {
		a.c.State, a.cDirty = keysvc.CampaignTracking, true
	}
	if a.finished() && a.c.Finished.IsZero() {
		if a.c.State == keysvc.CampaignTracking {
			a.c.State = keysvc.CampaignDone
		}
		a.c.Finished, a.cDirty = now, true
	}
}

// merge takes in a campaign written by someone else (a cancel on another
// broker): its state if it was cancelled, and its version.
func (r *Runner) merge(ctx context.Context, a *run) {
	stored, err := r.keys.GetCampaign(ctx, a.c.ID)
	if err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if stored.State == keysvc.CampaignCancelled && (a.c.State == keysvc.CampaignRunning || a.c.State == keysvc.CampaignTracking) {
		a.c.State = keysvc.CampaignCancelled
	}
	a.c.Version = stored.Version
	a.cDirty = true
}

// Package storetest is the conformance suite of keysvc.Store: every store
// (keysvc/boltstore, keysvc/vaultstore) runs it from its own tests.
//
//	func TestConformance(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) keysvc.Store { return openStore(t) }, storetest.Options{...})
//	}
//
// Failure messages never print secrets.
package storetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Options carry the backend-specific hooks of the suite. Nil hooks skip the
// tests that need them.
type Options struct {
	// Reopen closes the store last returned by open (or Reopen) in this
	// test and opens the same data again, as a process restart would.
	Reopen func(t *testing.T) keysvc.Store
	// Stop makes the store last opened in this test unreachable: afterwards
	// its operations fail with keysvc.ErrUnavailable. For Vault: stop the
	// server; for the embedded store: close it.
	Stop func(t *testing.T)
	// Forbidden, if set, returns a store on the same data whose credentials
	// lack permission: its reads must fail with keysvc.ErrForbidden.
	Forbidden func(t *testing.T) keysvc.Store
}

// Clock is a settable clock for keysvc.Options.Now, safe for concurrent use.
type Clock struct {
	mu  sync.Mutex
	now time.Time
}

// NewClock returns a Clock at t.
func NewClock(t time.Time) *Clock { return &Clock{now: t} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

// Advance moves the clock by d.
func (c *Clock) Advance(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

// Run runs the suite. open returns a fresh or shared store; the suite
// isolates itself with a random sn prefix, so a store holding other data
// (a shared Vault) is fine. The suite closes what open returns.
func Run(t *testing.T, open func(t *testing.T) keysvc.Store, opts Options) {
	prefix := randomPrefix(t)
	var n atomic.Int64
	// sn returns a fresh serial number of this run.
	sn := func() string { return fmt.Sprintf("%s%05d", prefix, n.Add(1)) }
	openT := func(t *testing.T) keysvc.Store {
		s := open(t)
		t.Cleanup(func() { s.Close() })
		return s
	}
	t.Run("CRUD", func(t *testing.T) { testCRUD(t, openT(t), sn) })
	t.Run("RoundTrip", func(t *testing.T) { testRoundTrip(t, openT(t), sn) })
	t.Run("List", func(t *testing.T) { testList(t, openT(t), prefix) })
	t.Run("CASConflict", func(t *testing.T) { testCAS(t, openT(t), sn) })
	t.Run("ConcurrentCommit", func(t *testing.T) { testConcurrentCommit(t, openT(t), sn) })
	t.Run("ChangeStateMachine", func(t *testing.T) { testChange(t, openT(t), sn) })
	t.Run("Apps", func(t *testing.T) { testApps(t, openT(t), prefix) })
	t.Run("Campaigns", func(t *testing.T) { testCampaigns(t, openT(t), sn, opts.Reopen) })
	t.Run("RestartMidChange", func(t *testing.T) {
		if opts.Reopen == nil {
			t.Skip("no Reopen hook")
		}
		testRestart(t, openT(t), opts.Reopen, sn)
	})
	t.Run("Unavailable", func(t *testing.T) {
		if opts.Stop == nil {
			t.Skip("no Stop hook")
		}
		testUnavailable(t, openT(t), opts.Stop, sn)
	})
	t.Run("Forbidden", func(t *testing.T) {
		if opts.Forbidden == nil {
			t.Skip("no Forbidden hook")
		}
		testForbidden(t, openT(t), opts.Forbidden, sn)
	})
}

func randomPrefix(t *testing.T) string {
	const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	p := []byte("T")
	for _, c := range b {
		p = append(p, abc[int(c)%len(abc)])
	}
	return string(p) // 5 letters + 5 digits from sn(): 10 characters
}

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// Terminal returns a valid record for sn with fixed, non-secret test values.
func Terminal(sn string) *keysvc.Terminal {
	return &keysvc.Terminal{
		SN: sn, IMEI: "356938035643809", IMSI: "460001234567890", MSISDN: "8613800138000",
		Alg: codec.HS256, Status: keysvc.StatusActive,
		Creds: keysvc.Credentials{
			Up: []byte("upPassword000001"), UpExp: codec.Never,
			Down: []byte("downPassword0001"), DownExp: 2000000000,
			BK: bytes.Repeat([]byte{0x42}, codec.BasicKeySize), BKExp: codec.Never,
		},
		Created: t0, Updated: t0,
	}
}

// Diff describes how two records differ, naming fields but never printing
// secret values; "" if they are equal (Version is not compared).
func Diff(a, b *keysvc.Terminal) string {
	var d []string
	add := func(ok bool, f string) {
		if !ok {
			d = append(d, f)
		}
	}
	add(a.SN == b.SN, fmt.Sprintf("sn %q/%q", a.SN, b.SN))
	add(a.IMEI == b.IMEI && a.IMSI == b.IMSI && a.MSISDN == b.MSISDN, "imei/imsi/msisdn")
	add(a.Alg == b.Alg, "alg")
	add(a.Status == b.Status, "status")
	add(a.RequireEncryption == b.RequireEncryption, "require_encryption")
	add(a.LastCommitted == b.LastCommitted, "last_committed")
	add(a.Created.Equal(b.Created) && a.Updated.Equal(b.Updated), "created/updated")
	d = append(d, credsDiff("", &a.Creds, &b.Creds)...)
	switch {
	case (a.Pending == nil) != (b.Pending == nil):
		d = append(d, "pending presence")
	case a.Pending != nil:
		p, q := a.Pending, b.Pending
		add(p.RID == q.RID, "pending rid")
		add(p.What == q.What && p.Mode == q.Mode && p.Origin == q.Origin, "pending what/mode/origin")
		add(p.Started.Equal(q.Started) && p.Deadline.Equal(q.Deadline), "pending started/deadline")
		add(p.Delivered == q.Delivered, "pending delivered")
		d = append(d, credsDiff("pending ", &p.New, &q.New)...)
	}
	return strings.Join(d, ", ")
}

func credsDiff(prefix string, a, b *keysvc.Credentials) []string {
	var d []string
	if !bytes.Equal(a.Up, b.Up) || a.UpExp != b.UpExp {
		d = append(d, prefix+"up/upexp")
	}
	if !bytes.Equal(a.Down, b.Down) || a.DownExp != b.DownExp {
		d = append(d, prefix+"down/downexp")
	}
	if !bytes.Equal(a.BK, b.BK) || a.BKExp != b.BKExp {
		d = append(d, prefix+"bk/bkexp")
	}
	return d
}

func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("%s: err = %v, want %v", what, err, want)
	}
}

func must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func testCRUD(t *testing.T, s keysvc.Store, sn func() string) {
	ctx := context.Background()
	id := sn()
	_, err := s.GetTerminal(ctx, id)
	wantErr(t, "get missing", err, keysvc.ErrNotFound)
	wantErr(t, "delete missing", s.DeleteTerminal(ctx, id), keysvc.ErrNotFound)
	gone := Terminal(id)
	wantErr(t, "update missing", s.UpdateTerminal(ctx, gone), keysvc.ErrNotFound)

	rec := Terminal(id)
	must(t, "create", s.CreateTerminal(ctx, rec))
	v1 := rec.Version
	wantErr(t, "create again", s.CreateTerminal(ctx, Terminal(id)), keysvc.ErrExists)

	got, err := s.GetTerminal(ctx, id)
	must(t, "get", err)
	if d := Diff(got, rec); d != "" {
		t.Fatalf("get after create differs in: %s", d)
	}
	if got.Version != v1 {
		t.Fatalf("get: version %d, create set %d", got.Version, v1)
	}

	got.Status = keysvc.StatusDisabled
	must(t, "update", s.UpdateTerminal(ctx, got))
	if got.Version == v1 {
		t.Fatal("update did not change the version")
	}
	stale := rec.Clone() // still at v1
	stale.MSISDN = "999"
	wantErr(t, "update from a stale version", s.UpdateTerminal(ctx, stale), keysvc.ErrConflict)
	again, err := s.GetTerminal(ctx, id)
	must(t, "get after update", err)
	if again.Status != keysvc.StatusDisabled || again.MSISDN != rec.MSISDN {
		t.Fatal("stored record is not the winning update")
	}

	must(t, "delete", s.DeleteTerminal(ctx, id))
	_, err = s.GetTerminal(ctx, id)
	wantErr(t, "get deleted", err, keysvc.ErrNotFound)
	wantErr(t, "update deleted", s.UpdateTerminal(ctx, again), keysvc.ErrNotFound)
	// A re-created record must not be writable with a version of the old one.
	must(t, "re-create", s.CreateTerminal(ctx, Terminal(id)))
	wantErr(t, "update with the deleted record's version", s.UpdateTerminal(ctx, again), keysvc.ErrConflict)
}

func testRoundTrip(t *testing.T, s keysvc.Store, sn func() string) {
	ctx := context.Background()
	md5 := Terminal(sn())
	md5.Alg, md5.MSISDN, md5.RequireEncryption, md5.Status = codec.MD5, "", true, keysvc.StatusDisabled
	pend := Terminal(sn())
	pend.LastCommitted = 0x00000000000000ff
	n := pend.Creds.Clone()
	n.Up, n.Down, n.UpExp = []byte("newUp00000000001"), []byte("newDown000000001"), 1900000000
	pend.Pending = &keysvc.Change{RID: 0xfedcba9876543210, What: codec.WhatPwd, Mode: codec.ModeSMS,
		Origin: keysvc.OriginTerminal, New: n, Started: t0, Deadline: t0.Add(24 * time.Hour), Delivered: true}
	for _, tc := range []struct {
		name string
		rec  *keysvc.Terminal
	}{
		{"plain", Terminal(sn())},
		{"md5 disabled encrypted", md5},
		{"pending change", pend},
	} {
		t.Run(tc.name, func(t *testing.T) {
			must(t, "create", s.CreateTerminal(ctx, tc.rec))
			got, err := s.GetTerminal(ctx, tc.rec.SN)
			must(t, "get", err)
			if d := Diff(got, tc.rec); d != "" {
				t.Fatalf("round trip differs in: %s", d)
			}
			// Clearing the pending change must stick too.
			got.Pending = nil
			must(t, "update", s.UpdateTerminal(ctx, got))
			again, err := s.GetTerminal(ctx, tc.rec.SN)
			must(t, "get", err)
			if again.Pending != nil {
				t.Fatal("pending change survived an update that cleared it")
			}
		})
	}
}

func testList(t *testing.T, s keysvc.Store, prefix string) {
	ctx := context.Background()
	var want []string
	for i := range 23 {
		id := fmt.Sprintf("%sL%03d", prefix, i)
		want = append(want, id)
		must(t, "create", s.CreateTerminal(ctx, Terminal(id)))
	}
	for _, limit := range []int{1, 5, 10, 23, 100} {
		var got []string
		after := prefix + "L" // sorts before every sn of this test
		for pages := 0; ; pages++ {
			if pages > 100 {
				t.Fatal("paging does not end")
			}
			page, err := s.ListTerminals(ctx, after, limit)
			must(t, "list", err)
			if len(page) > limit {
				t.Fatalf("limit %d: page of %d", limit, len(page))
			}
			if !slices.IsSorted(page) {
				t.Fatalf("limit %d: page not sorted: %v", limit, page)
			}
			done := len(page) == 0
			for _, id := range page {
				if id <= after {
					t.Fatalf("limit %d: %q not after %q", limit, id, after)
				}
				if !strings.HasPrefix(id, prefix+"L") {
					done = true
					break
				}
				got = append(got, id)
			}
			if done || len(page) < limit {
				break
			}
			after = page[len(page)-1]
		}
		if !slices.Equal(got, want) {
			t.Fatalf("limit %d: listed %v, want %v", limit, got, want)
		}
	}
	all, err := s.ListTerminals(ctx, want[len(want)-1], 0)
	must(t, "list without limit", err)
	for _, id := range all {
		if strings.HasPrefix(id, prefix+"L") {
			t.Fatalf("list after the last: got %q", id)
		}
	}
}

func testCAS(t *testing.T, s keysvc.Store, sn func() string) {
	ctx := context.Background()
	for round := range 5 {
		rec := Terminal(sn())
		must(t, "create", s.CreateTerminal(ctx, rec))
		var wg sync.WaitGroup
		errs := make([]error, 2)
		start := make(chan struct{})
		for i := range 2 {
			c := rec.Clone()
			c.MSISDN = fmt.Sprintf("10000%d", i)
			wg.Go(func() {
				<-start
				errs[i] = s.UpdateTerminal(ctx, c)
			})
		}
		close(start)
		wg.Wait()
		won := 0
		for _, err := range errs {
			switch {
			case err == nil:
				won++
			case errors.Is(err, keysvc.ErrConflict):
			default:
				t.Fatalf("round %d: unexpected error %v", round, err)
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d updates from one version won, want exactly 1", round, won)
		}
	}
}

// countingStore counts successful UpdateTerminal calls.
type countingStore struct {
	keysvc.Store
	updates atomic.Int64
}

func (c *countingStore) UpdateTerminal(ctx context.Context, t *keysvc.Terminal) error {
	err := c.Store.UpdateTerminal(ctx, t)
	if err == nil {
		c.updates.Add(1)
	}
	return err
}

func newService(t *testing.T, s keysvc.Store, clock *Clock) *keysvc.Service {
	t.Helper()
	svc, err := keysvc.New(keysvc.Options{Store: s, Now: clock.Now,
		AppHash: keysvc.AppHashParams{Time: 1, Memory: 64, Threads: 1}})
	must(t, "new service", err)
	return svc
}

func register(t *testing.T, svc *keysvc.Service, sn string) *keysvc.Terminal {
	t.Helper()
	rec, err := svc.Register(context.Background(), keysvc.RegisterRequest{
		SN: sn, IMEI: "356938035643809", IMSI: "460001234567890", MSISDN: "8613800138000"})
	must(t, "register", err)
	return rec
}

func testConcurrentCommit(t *testing.T, s keysvc.Store, sn func() string) {
	ctx := context.Background()
	cs := &countingStore{Store: s}
	svc := newService(t, cs, NewClock(t0))
	for round := range 5 {
		id := sn()
		old := register(t, svc, id)
		ch, err := svc.StartChange(ctx, id, keysvc.ChangeRequest{What: codec.WhatAll, Mode: codec.ModeCipher, Origin: keysvc.OriginTerminal})
		must(t, "start change", err)
		before := cs.updates.Load()
		var wg sync.WaitGroup
		errs := make([]error, 2)
		start := make(chan struct{})
		for i := range 2 {
			wg.Go(func() {
				<-start
				_, errs[i] = svc.CommitChange(ctx, id, ch.RID)
			})
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: commit %d: %v (want both to succeed: commit is idempotent)", round, i, err)
			}
		}
		if n := cs.updates.Load() - before; n != 1 {
			t.Fatalf("round %d: %d store writes for one commit, want 1", round, n)
		}
		got, err := svc.Get(ctx, id)
		must(t, "get", err)
		if got.Pending != nil || got.LastCommitted != ch.RID {
			t.Fatalf("round %d: change not committed", round)
		}
		if d := credsDiff("", &got.Creds, &ch.New); d != nil {
			t.Fatalf("round %d: committed credentials differ from the change in %v", round, d)
		}
		if bytes.Equal(got.Creds.Up, old.Creds.Up) || bytes.Equal(got.Creds.BK, old.Creds.BK) {
			t.Fatalf("round %d: old credentials still current", round)
		}
	}
}

func testChange(t *testing.T, s keysvc.Store, sn func() string) {
	ctx := context.Background()
	clock := NewClock(t0)
	svc := newService(t, s, clock)
	id := sn()
	old := register(t, svc, id)

	// start, busy
	ch, err := svc.StartChange(ctx, id, keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher})
	must(t, "start", err)
	if ch.RID == 0 || !ch.Deadline.Equal(t0.Add(24*time.Hour)) || ch.Origin != keysvc.OriginOperator {
		t.Fatal("change: bad rid, deadline or origin")
	}
	if bytes.Equal(ch.New.Up, old.Creds.Up) || bytes.Equal(ch.New.Down, old.Creds.Down) || !bytes.Equal(ch.New.BK, old.Creds.BK) {
		t.Fatal("pwd change: want new passwords and the same basic key")
	}
	_, err = svc.StartChange(ctx, id, keysvc.ChangeRequest{What: codec.WhatBK, Mode: codec.ModeCipher})
	wantErr(t, "second start", err, keysvc.ErrBusy)

	// login semantics while pending
	rec, err := svc.Lookup(ctx, id)
	must(t, "lookup", err)
	for _, tc := range []struct {
		name string
		up   []byte
		want keysvc.Match
	}{
		{"current", old.Creds.Up, keysvc.MatchCurrent},
		{"pending", ch.New.Up, keysvc.MatchPending},
		{"neither", []byte("wrongPassword000"), keysvc.MatchNone},
	} {
		calls := 0
		m := rec.MatchUplink(func(up []byte) bool { calls++; return bytes.Equal(up, tc.up) })
		if m != tc.want || calls != 2 {
			t.Fatalf("MatchUplink %s: got %v after %d verifications, want %v after 2", tc.name, m, calls, tc.want)
		}
	}

	// delivered, unknown rid, commit, idempotent commit
	_, err = svc.MarkDelivered(ctx, id, ch.RID+1, codec.ModeCipher)
	wantErr(t, "mark delivered, wrong rid", err, keysvc.ErrUnknownRID)
	d, err := svc.MarkDelivered(ctx, id, ch.RID, codec.ModeCipher)
	must(t, "mark delivered", err)
	if !d.Pending.Delivered {
		t.Fatal("not marked delivered")
	}
	_, err = svc.CommitChange(ctx, id, ch.RID+1)
	wantErr(t, "commit unknown rid", err, keysvc.ErrUnknownRID)
	c1, err := svc.CommitChange(ctx, id, ch.RID)
	must(t, "commit", err)
	if c1.Pending != nil || !bytes.Equal(c1.Creds.Up, ch.New.Up) || c1.LastCommitted != ch.RID {
		t.Fatal("commit: new values not current")
	}
	c2, err := svc.CommitChange(ctx, id, ch.RID)
	must(t, "commit again (idempotent)", err)
	if c2.Version != c1.Version {
		t.Fatal("idempotent commit wrote the record again")
	}
	rec, err = svc.Lookup(ctx, id)
	must(t, "lookup after commit", err)
	if m := rec.MatchUplink(func(up []byte) bool { return bytes.Equal(up, old.Creds.Up) }); m != keysvc.MatchNone {
		t.Fatal("old up password still valid after commit")
	}

	// bk-only change: the unchanged up must not commit it
	bk, err := svc.StartChange(ctx, id, keysvc.ChangeRequest{What: codec.WhatBK, Mode: codec.ModeCipher})
	must(t, "start bk", err)
	rec, err = svc.Lookup(ctx, id)
	must(t, "lookup", err)
	if m := rec.MatchUplink(func(up []byte) bool { return bytes.Equal(up, c1.Creds.Up) }); m != keysvc.MatchCurrent {
		t.Fatalf("bk change: login with the current up gives %v, want current", m)
	}
	// a late duplicate commit of the previous rid is still fine
	_, err = svc.CommitChange(ctx, id, ch.RID)
	must(t, "late commit of the previous rid", err)

	// expiry: before the deadline nothing happens, after it the change goes
	dropped, err := svc.ExpireChange(ctx, id)
	must(t, "expire early", err)
	if dropped {
		t.Fatal("expired a change before its deadline")
	}
	clock.Advance(24*time.Hour + time.Second)
	rec, err = svc.Lookup(ctx, id)
	must(t, "lookup past deadline", err)
	if rec.Pending != nil {
		t.Fatal("Lookup returned a change past its deadline")
	}
	_, err = svc.CommitChange(ctx, id, bk.RID)
	wantErr(t, "commit past deadline", err, keysvc.ErrUnknownRID)
	got, err := svc.Get(ctx, id)
	must(t, "get", err)
	if got.Pending != nil || !bytes.Equal(got.Creds.BK, c1.Creds.BK) || got.LastCommitted != ch.RID {
		t.Fatal("expired change: want it dropped and the old values kept")
	}
	dropped, err = svc.ExpireChange(ctx, id)
	must(t, "expire with nothing pending", err)
	if dropped {
		t.Fatal("ExpireChange dropped something with nothing pending")
	}

	// ExpireChange proper, and a start after an expired change
	e1, err := svc.StartChange(ctx, id, keysvc.ChangeRequest{What: codec.WhatAll, Mode: codec.ModeSMS, Origin: keysvc.OriginExpiry})
	must(t, "start all/sms", err)
	clock.Advance(25 * time.Hour)
	dropped, err = svc.ExpireChange(ctx, id)
	must(t, "expire", err)
	if !dropped {
		t.Fatal("ExpireChange kept a change past its deadline")
	}
	e2, err := svc.StartChange(ctx, id, keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher})
	must(t, "start after expiry", err)
	clock.Advance(25 * time.Hour)
	e3, err := svc.StartChange(ctx, id, keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher})
	must(t, "start over an expired change", err)
	if e3.RID == e2.RID || e3.RID == e1.RID {
		t.Fatal("rid reused")
	}

	// bad requests and unknown terminals
	for _, tc := range []struct {
		name string
		sn   string
		r    keysvc.ChangeRequest
		want error
	}{
		{"bad what", id, keysvc.ChangeRequest{What: "x", Mode: codec.ModeCipher}, keysvc.ErrInvalid},
		{"bad mode", id, keysvc.ChangeRequest{What: codec.WhatPwd, Mode: "x"}, keysvc.ErrInvalid},
		{"bad origin", id, keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher, Origin: "x"}, keysvc.ErrInvalid},
		{"unknown sn", sn(), keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher}, keysvc.ErrNotFound},
	} {
		_, err := svc.StartChange(ctx, tc.sn, tc.r)
		wantErr(t, tc.name, err, tc.want)
	}
	_, err = svc.CommitChange(ctx, sn(), 1)
	wantErr(t, "commit unknown sn", err, keysvc.ErrNotFound)
}

func testApps(t *testing.T, s keysvc.Store, prefix string) {
	ctx := context.Background()
	name := prefix + "-app"
	_, err := s.GetApp(ctx, name)
	wantErr(t, "get missing app", err, keysvc.ErrNotFound)
	wantErr(t, "delete missing app", s.DeleteApp(ctx, name), keysvc.ErrNotFound)
	a := &keysvc.App{Name: name, PasswordHash: "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
		Subscribe: []string{"m2m/+/up/#"}, Publish: []string{"m2m/+/down/#", "m2m/x/down/y"}, Created: t0}
	must(t, "put app", s.PutApp(ctx, a))
	got, err := s.GetApp(ctx, name)
	must(t, "get app", err)
	if got.Name != a.Name || got.PasswordHash != a.PasswordHash || !slices.Equal(got.Subscribe, a.Subscribe) ||
		!slices.Equal(got.Publish, a.Publish) || !got.Created.Equal(a.Created) {
		t.Fatal("app round trip changed it")
	}
	a.Publish = nil
	must(t, "replace app", s.PutApp(ctx, a))
	got, err = s.GetApp(ctx, name)
	must(t, "get app", err)
	if len(got.Publish) != 0 {
		t.Fatal("replace did not replace")
	}
	names, err := s.ListApps(ctx)
	must(t, "list apps", err)
	if !slices.Contains(names, name) || !slices.IsSorted(names) {
		t.Fatalf("list apps: %v, want sorted, holding %q", names, name)
	}
	must(t, "delete app", s.DeleteApp(ctx, name))
	_, err = s.GetApp(ctx, name)
	wantErr(t, "get deleted app", err, keysvc.ErrNotFound)

	// Through the Service: hashing and verification.
	svc := newService(t, s, NewClock(t0))
	pw := []byte("app-password-0001")
	_, err = svc.AddApp(ctx, keysvc.AddAppRequest{Name: name, Password: pw})
	must(t, "add app", err)
	for _, tc := range []struct {
		name, app string
		pw        []byte
		want      error
	}{
		{"right", name, pw, nil},
		{"wrong password", name, []byte("app-password-0002"), keysvc.ErrBadCredentials},
		{"unknown app", name + "x", pw, keysvc.ErrBadCredentials},
		{"invalid name", "/", pw, keysvc.ErrBadCredentials},
	} {
		got, err := svc.VerifyApp(ctx, tc.app, tc.pw)
		if tc.want == nil {
			must(t, "verify "+tc.name, err)
			if !slices.Equal(got.Subscribe, keysvc.DefaultAppSubscribe) || !slices.Equal(got.Publish, keysvc.DefaultAppPublish) {
				t.Fatal("app: default reach not applied")
			}
			continue
		}
		wantErr(t, "verify "+tc.name, err, tc.want)
	}
	must(t, "remove app", svc.RemoveApp(ctx, name))
}

func testRestart(t *testing.T, s keysvc.Store, reopen func(t *testing.T) keysvc.Store, sn func() string) {
	ctx := context.Background()
	clock := NewClock(t0)
	svc := newService(t, s, clock)
	id := sn()
	register(t, svc, id)
	ch, err := svc.StartChange(ctx, id, keysvc.ChangeRequest{What: codec.WhatAll, Mode: codec.ModeCipher})
	must(t, "start", err)
	_, err = svc.MarkDelivered(ctx, id, ch.RID, codec.ModeCipher)
	must(t, "mark delivered", err)

	s2 := reopen(t)
	t.Cleanup(func() { s2.Close() })
	svc2 := newService(t, s2, clock)
	got, err := svc2.Get(ctx, id)
	must(t, "get after restart", err)
	want := ch.Clone()
	want.Delivered = true
	if got.Pending == nil {
		t.Fatal("pending change lost in the restart")
	}
	if d := Diff(&keysvc.Terminal{Pending: got.Pending}, &keysvc.Terminal{Pending: want}); d != "" {
		t.Fatalf("pending change changed in the restart: %s", d)
	}
	c, err := svc2.CommitChange(ctx, id, ch.RID)
	must(t, "commit after restart", err)
	if d := credsDiff("", &c.Creds, &ch.New); d != nil {
		t.Fatalf("committed credentials differ in %v", d)
	}
}

func testUnavailable(t *testing.T, s keysvc.Store, stop func(t *testing.T), sn func() string) {
	ctx := context.Background()
	clock := NewClock(t0)
	svc, err := keysvc.New(keysvc.Options{Store: s, Now: clock.Now, Cache: keysvc.CacheOptions{
		TTL: 30 * time.Second, MaxStale: 10 * time.Minute, NegativeTTL: time.Second}})
	must(t, "new service", err)
	known := sn()
	register(t, svc, known)
	_, err = svc.Lookup(ctx, known)
	must(t, "lookup", err)
	unknown := sn()
	_, err = svc.Lookup(ctx, unknown)
	wantErr(t, "lookup unknown", err, keysvc.ErrNotFound)

	stop(t)
	clock.Advance(time.Minute) // past the TTL: the cache must ask the store
	rec, err := svc.Lookup(ctx, known)
	must(t, "lookup of a known terminal with the store down, inside MaxStale", err)
	if rec.SN != known {
		t.Fatal("stale lookup returned another record")
	}
	st := svc.CacheStats()
	if st.Stale == 0 {
		t.Fatal("stale serve not counted")
	}
	_, err = svc.Lookup(ctx, unknown)
	wantErr(t, "lookup of an unknown terminal with the store down (fail closed)", err, keysvc.ErrUnavailable)
	_, err = svc.Lookup(ctx, sn())
	wantErr(t, "lookup of a never-seen terminal with the store down", err, keysvc.ErrUnavailable)
	_, err = svc.StartChange(ctx, known, keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher})
	wantErr(t, "start change with the store down", err, keysvc.ErrUnavailable)
	clock.Advance(10 * time.Minute)
	_, err = svc.Lookup(ctx, known)
	wantErr(t, "lookup of a known terminal past MaxStale", err, keysvc.ErrUnavailable)
}

func testForbidden(t *testing.T, s keysvc.Store, forbidden func(t *testing.T) keysvc.Store, sn func() string) {
	ctx := context.Background()
	id := sn()
	must(t, "create", s.CreateTerminal(ctx, Terminal(id)))
	f := forbidden(t)
	t.Cleanup(func() { f.Close() })
	_, err := f.GetTerminal(ctx, id)
	wantErr(t, "get with a forbidden token", err, keysvc.ErrForbidden)
	wantErr(t, "create with a forbidden token", f.CreateTerminal(ctx, Terminal(sn())), keysvc.ErrForbidden)
}

// campaignDiff names the fields in which two campaigns differ ("" if none;
// Version and Updated are not compared).
func campaignDiff(a, b *keysvc.Campaign) string {
	var d []string
	add := func(ok bool, f string) {
		if !ok {
			d = append(d, f)
		}
	}
	add(a.ID == b.ID, "id")
	add(a.Selection.Kind == b.Selection.Kind && a.Selection.Before.Equal(b.Selection.Before) &&
		a.Selection.Status == b.Selection.Status && slices.Equal(a.Selection.SNs, b.Selection.SNs), "selection")
	add(a.What == b.What && a.Rate == b.Rate, "what/rate")
	add(a.State == b.State && a.Cursor == b.Cursor, "state/cursor")
	add(a.Counts == b.Counts, "counts")
	add(a.Created.Equal(b.Created) && a.Finished.Equal(b.Finished), "created/finished")
	return strings.Join(d, ", ")
}

func testCampaigns(t *testing.T, s keysvc.Store, sn func() string, reopen func(t *testing.T) keysvc.Store) {
	ctx := context.Background()
	svc := newService(t, s, NewClock(t0))

	// Validation, through the Service.
	for _, tc := range []struct {
		name string
		req  keysvc.CampaignRequest
	}{
		{"bad what", keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectAll}, What: "keys", Rate: 1}},
		{"zero rate", keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectAll}, What: codec.WhatPwd}},
		{"no kind", keysvc.CampaignRequest{What: codec.WhatPwd, Rate: 1}},
		{"expiring without date", keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectExpiring}, What: codec.WhatPwd, Rate: 1}},
		{"bad status", keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectStatus, Status: "gone"}, What: codec.WhatPwd, Rate: 1}},
		{"empty list", keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectList}, What: codec.WhatPwd, Rate: 1}},
		{"bad sn in list", keysvc.CampaignRequest{Selection: keysvc.Selection{Kind: keysvc.SelectList, SNs: []string{"A1", "a/b"}}, What: codec.WhatPwd, Rate: 1}},
	} {
		_, err := svc.CreateCampaign(ctx, tc.req)
		wantErr(t, "create campaign, "+tc.name, err, keysvc.ErrInvalid)
	}

	// A list selection is stored sorted and without duplicates.
	a, b, c := sn(), sn(), sn()
	camp, err := svc.CreateCampaign(ctx, keysvc.CampaignRequest{
		Selection: keysvc.Selection{Kind: keysvc.SelectList, SNs: []string{c, a, b, a}}, What: codec.WhatPwd, Rate: 2.5})
	must(t, "create campaign", err)
	if camp.State != keysvc.CampaignRunning || keysvc.ValidateCampaignID(camp.ID) != nil || camp.Version == 0 {
		t.Fatalf("created campaign: state %q, id %q, version %d", camp.State, camp.ID, camp.Version)
	}
	if !slices.Equal(camp.Selection.SNs, []string{a, b, c}) {
		t.Fatalf("list selection stored as %v, want %v", camp.Selection.SNs, []string{a, b, c})
	}
	got, err := s.GetCampaign(ctx, camp.ID)
	must(t, "get campaign", err)
	if d := campaignDiff(got, camp); d != "" || got.Version != camp.Version {
		t.Fatalf("campaign round trip changed %s (version %d, want %d)", d, got.Version, camp.Version)
	}
	wantErr(t, "create again", s.CreateCampaign(ctx, camp.Clone()), keysvc.ErrExists)
	_, err = s.GetCampaign(ctx, "0123456789abcdef")
	wantErr(t, "get missing campaign", err, keysvc.ErrNotFound)

	// Check-and-set; the selection is not rewritten by an update.
	upd := got.Clone()
	upd.State, upd.Cursor = keysvc.CampaignTracking, b
	upd.Counts.Add(keysvc.OutcomeCommitted, 2)
	upd.Counts.Add(keysvc.OutcomeWaiting, 1)
	upd.Finished = t0.Add(time.Hour)
	upd.Selection.SNs = nil
	must(t, "update campaign", s.UpdateCampaign(ctx, upd))
	if upd.Version == got.Version {
		t.Fatal("update did not change the version")
	}
	stale := got.Clone()
	wantErr(t, "update from a stale version", s.UpdateCampaign(ctx, stale), keysvc.ErrConflict)
	gone := got.Clone()
	gone.ID = "fedcba9876543210"
	wantErr(t, "update missing", s.UpdateCampaign(ctx, gone), keysvc.ErrNotFound)
	got, err = s.GetCampaign(ctx, camp.ID)
	must(t, "get updated campaign", err)
	want := upd.Clone()
	want.Selection.SNs = []string{a, b, c}
	if d := campaignDiff(got, want); d != "" {
		t.Fatalf("updated campaign differs in %s", d)
	}

	// Other selections round-trip too.
	exp, err := svc.CreateCampaign(ctx, keysvc.CampaignRequest{
		Selection: keysvc.Selection{Kind: keysvc.SelectExpiring, Before: t0.Add(48 * time.Hour)}, What: codec.WhatAll, Rate: 100})
	must(t, "create expiring campaign", err)
	st, err := svc.CreateCampaign(ctx, keysvc.CampaignRequest{
		Selection: keysvc.Selection{Kind: keysvc.SelectStatus, Status: keysvc.StatusDisabled}, What: codec.WhatBK, Rate: 1})
	must(t, "create status campaign", err)
	for _, x := range []*keysvc.Campaign{exp, st} {
		got, err := s.GetCampaign(ctx, x.ID)
		must(t, "get campaign", err)
		if d := campaignDiff(got, x); d != "" {
			t.Fatalf("campaign round trip changed %s", d)
		}
	}
	ids, err := s.ListCampaigns(ctx)
	must(t, "list campaigns", err)
	for _, id := range []string{camp.ID, exp.ID, st.ID} {
		if !slices.Contains(ids, id) {
			t.Fatalf("list campaigns: %v lacks %s", ids, id)
		}
	}
	if !slices.IsSorted(ids) {
		t.Fatalf("list campaigns: %v not sorted", ids)
	}

	// Items: created and replaced by serial number, listed in order, paged.
	deadline := t0.Add(24 * time.Hour)
	items := []keysvc.CampaignItem{
		{SN: c, Outcome: keysvc.OutcomeWaiting, RID: 0x0123456789abcdef, Deadline: deadline, Updated: t0},
		{SN: a, Outcome: keysvc.OutcomeBusy, Updated: t0},
		{SN: b, Outcome: keysvc.OutcomeFailed, Reason: "deleted", Updated: t0},
	}
	must(t, "put items", s.PutCampaignItems(ctx, camp.ID, items))
	items[0].Outcome, items[0].Updated = keysvc.OutcomeCommitted, t0.Add(time.Minute)
	must(t, "replace item", s.PutCampaignItems(ctx, camp.ID, items[:1]))
	all, err := s.ListCampaignItems(ctx, camp.ID, "", 0)
	must(t, "list items", err)
	wantItems := []keysvc.CampaignItem{items[1], items[2], items[0]}
	if len(all) != len(wantItems) {
		t.Fatalf("list items: %d items, want %d", len(all), len(wantItems))
	}
	for i := range all {
		g, w := all[i], wantItems[i]
		if g.SN != w.SN || g.Outcome != w.Outcome || g.RID != w.RID || !g.Deadline.Equal(w.Deadline) ||
			g.Reason != w.Reason || !g.Updated.Equal(w.Updated) {
			t.Fatalf("item %d: %+v, want %+v", i, g, w)
		}
	}
	page, err := s.ListCampaignItems(ctx, camp.ID, a, 1)
	must(t, "list items after", err)
	if len(page) != 1 || page[0].SN != b {
		t.Fatalf("list items after %s, limit 1: %+v", a, page)
	}
	none, err := s.ListCampaignItems(ctx, exp.ID, "", 0)
	must(t, "list items of a campaign without any", err)
	if len(none) != 0 {
		t.Fatalf("items of a new campaign: %d", len(none))
	}
	wantErr(t, "put items of a missing campaign", s.PutCampaignItems(ctx, "0123456789abcdef", items[:1]), keysvc.ErrNotFound)
	_, err = s.ListCampaignItems(ctx, "0123456789abcdef", "", 0)
	wantErr(t, "list items of a missing campaign", err, keysvc.ErrNotFound)

	if reopen == nil {
		return
	}
	s2 := reopen(t)
	t.Cleanup(func() { s2.Close() })
	got, err = s2.GetCampaign(ctx, camp.ID)
	must(t, "get campaign after restart", err)
	if d := campaignDiff(got, want); d != "" {
		t.Fatalf("campaign changed in the restart: %s", d)
	}
	all, err = s2.ListCampaignItems(ctx, camp.ID, "", 0)
	must(t, "list items after restart", err)
	if len(all) != 3 || all[2].Outcome != keysvc.OutcomeCommitted {
		t.Fatalf("items after restart: %+v", all)
	}
}

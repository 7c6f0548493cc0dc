package fleettest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
)

// TestFleet runs the fleet-mode attacks of SECURITY.md against three brokers on one Vault,
// from outside: MQTT logins on raw sockets and the client library, and the
// admin API. The subtests share the fleet and run in parallel, each with
// terminals of its own.
func TestFleet(t *testing.T) {
	v := vaulttest.Start(t)
	f := startFleet(t, v, 3, fleetMode(t, 3))
	A, B, C := f.members[0], f.members[1], f.members[2]

	// Password guesses spread over the three brokers count together: after
	// six failures (two per broker, over auth.throttle_free 5) the genuine
	// password from that address is refused on every broker. (Not in
	// parallel: it counts the failures C applies.)
	t.Run("ThrottleCountsFleetWide", func(t *testing.T) {
		tm := f.register(t, 2, "FLEETTHROTTLE1")
		applied := metric(t, C, "m2mguard_fleet_throttle_applied_total")
		for range 2 {
			for _, m := range f.members {
				if _, code := login(t, m, tm, []byte("wrong-password-00")); code == 0 {
					t.Fatal("a wrong password got in")
				}
			}
		}
		checkFor(t, 3*time.Second, "C applied A's and B's failures", func() bool {
			return !fleetEnabled || metric(t, C, "m2mguard_fleet_throttle_applied_total")-applied >= 4
		})
		if _, code := login(t, C, tm, tm.Creds.Up); code == 0 {
			t.Error("six guesses spread over three brokers: the genuine password from the guessing address still got in")
		}
	})

	// A terminal with a persistent session on A moves to B while A is
	// down: A, restarted, does not restore the session from its session
	// store (it lives on B now). (Not in parallel: it restarts A before
	// the parallel subtests start.)
	t.Run("RestartedBrokerKeepsNoMovedSession", func(t *testing.T) {
		tm := f.register(t, 0, "FLEETRESTART1")
		c, code := dial(t, A.b.Addr("tcp"), connectWith(t, tm, tm.Creds.Up, false))
		if code != 0 {
			t.Fatalf("login on A: CONNACK %#x", code)
		}
		c.Close()
		checkFor(t, 5*time.Second, "A keeps the offline session", func() bool {
			cl, ok := A.b.Server().Clients.Get(tm.SN)
			return ok && cl.Closed()
		})
		if err := A.b.Close(); err != nil {
			t.Fatal(err)
		}
		if _, code := login(t, B, tm, tm.Creds.Up); code != 0 {
			t.Fatalf("login on B while A is down: CONNACK %#x", code)
		}
		f.restart(t, 0)
		if _, ok := A.b.Server().Clients.Get(tm.SN); ok {
			t.Error("A restored the session of a terminal that logged in on B while A was down")
		}
	})

	// A login token accepted on A is captured and replayed on B and C.
	t.Run("ReplayedTokenRefusedOnEveryBroker", func(t *testing.T) {
		t.Parallel()
		tm := f.register(t, 0, "FLEETREPLAY1")
		captured := connectBytes(t, tm, tm.Creds.Up)
		if _, code := dial(t, A.b.Addr("tcp"), captured); code != 0 {
			t.Fatalf("genuine login on A: CONNACK %#x", code)
		}
		for _, m := range []*member{B, C, A} {
			if _, code := dial(t, m.b.Addr("tcp"), captured); code == 0 {
				t.Errorf("the token accepted on A was accepted again on %s", m.name)
			}
		}
	})

	// An operator disables a terminal through B while it is connected to
	// A: A ends the session within 1 s and no broker lets it in again.
	t.Run("DisableEndsSessionsEverywhere", func(t *testing.T) {
		t.Parallel()
		tm := f.register(t, 1, "FLEETDISABLE1")
		for _, m := range f.members { // every broker has the record in its cache
			c, code := login(t, m, tm, tm.Creds.Up)
			if code != 0 {
				t.Fatalf("login on %s: CONNACK %#x", m.name, code)
			}
			c.Close()
		}
		conn, code := login(t, A, tm, tm.Creds.Up)
		if code != 0 {
			t.Fatalf("login on A: CONNACK %#x", code)
		}
		start := time.Now()
		if _, err := B.api.DisableTerminal(context.Background(), tm.SN); err != nil {
			t.Fatal(err)
		}
		if !closedWithin(conn, time.Second-time.Since(start)) {
			t.Error("disabled through B, the terminal's session on A is still open after 1 s")
		} else {
			t.Logf("session on A closed %v after the disable request to B", time.Since(start).Round(time.Millisecond))
		}
		for _, m := range f.members {
			if _, code := login(t, m, tm, tm.Creds.Up); code == 0 {
				t.Errorf("disabled through B, the terminal still logs in on %s", m.name)
			}
		}
	})

	// A password commit through A (the terminal logs in there with the
	// new password of a pending change): at once, the old password is
	// refused on B, whose cache held the record, and the new one works.
	t.Run("CommitRefusesOldPasswordEverywhere", func(t *testing.T) {
		t.Parallel()
		tm := f.register(t, 0, "FLEETCOMMIT1")
		for _, m := range f.members {
			c, code := login(t, m, tm, tm.Creds.Up)
			if code != 0 {
				t.Fatalf("login on %s: CONNACK %#x", m.name, code)
			}
			c.Close()
		}
		ctx := context.Background()
		if _, err := A.api.StartChange(ctx, tm.SN, "pwd"); err != nil {
			t.Fatal(err)
		}
		rec, err := A.b.Service().Get(ctx, tm.SN)
		if err != nil || rec.Pending == nil {
			t.Fatalf("no pending change: %v", err)
		}
		newUp := rec.Pending.New.Up
		if c, code := login(t, A, tm, newUp); code != 0 {
			t.Fatalf("login on A with the new password: CONNACK %#x", code)
		} else {
			c.Close()
		}
		if _, code := login(t, B, tm, tm.Creds.Up); code == 0 {
			t.Error("after the commit on A, B accepted the old password")
		}
		for _, m := range []*member{B, C} {
			if c, code := login(t, m, tm, newUp); code != 0 {
				t.Errorf("after the commit on A, %s refused the new password: CONNACK %#x", m.name, code)
			} else {
				c.Close()
			}
		}
	})

	// An operator starts a change through A for a terminal connected to
	// C: it reaches the terminal at once, and commits.
	t.Run("ChangeStartReachesTheHoldingBroker", func(t *testing.T) {
		t.Parallel()
		tm := f.register(t, 0, "FLEETCHANGE1")
		events := make(chan client.Event, 64)
		rec := &client.Record{Identity: tm.Identity(), Alg: tm.Alg, Current: client.Credentials{
			Up: tm.Creds.Up, UpExp: tm.Creds.UpExp, Down: tm.Creds.Down, DownExp: tm.Creds.DownExp, BK: tm.Creds.BK, BKExp: tm.Creds.BKExp}}
		c, err := client.New(client.Config{Brokers: []string{"tcp://" + C.b.Addr("tcp")}, Identity: rec.Identity, Alg: rec.Alg,
			Store: client.NewMemStore(rec), SessionKey: true, CleanSession: true,
			OnEvent: func(e client.Event) {
				select {
				case events <- e:
				default:
				}
			}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := c.Connect(ctx); err != nil {
			t.Fatal(err)
		}
		checkFor(t, 5*time.Second, "the fleet's directory knows the session on C", func() bool {
			e, ok, err := A.b.Fleet().Directory().Lookup(ctx, tm.SN)
			return err == nil && ok && e.Broker == C.b.Fleet().BrokerID()
		})
		ch, err := A.api.StartChange(ctx, tm.SN, "all")
		if err != nil {
			t.Fatal(err)
		}
		if !ch.Delivered {
			t.Error("change started through A for a terminal on C: not delivered")
		}
		deadline := time.After(5 * time.Second)
		for committed := false; !committed; {
			select {
			case e := <-events:
				if e.Kind == client.EventChangeCommitted {
					committed = true
				}
			case <-deadline:
				t.Fatal("the change started through A did not reach the terminal on C and commit within 5 s")
			}
		}
		after, err := C.b.Service().Get(ctx, tm.SN)
		if err != nil {
			t.Fatal(err)
		}
		if string(after.Creds.Up) == string(tm.Creds.Up) || after.LastCommitted.String() != ch.RID {
			t.Fatalf("store: last committed %s, want %s with new values", after.LastCommitted, ch.RID)
		}
	})

	// An operator disconnects, through A, a terminal connected to C: C
	// ends the session before the call returns.
	t.Run("DisconnectReachesTheHoldingBroker", func(t *testing.T) {
		t.Parallel()
		tm := f.register(t, 0, "FLEETDISC1")
		conn, code := login(t, C, tm, tm.Creds.Up)
		if code != 0 {
			t.Fatalf("login on C: CONNACK %#x", code)
		}
		ctx := context.Background()
		checkFor(t, 5*time.Second, "the fleet's directory knows the session on C", func() bool {
			e, ok, err := A.b.Fleet().Directory().Lookup(ctx, tm.SN)
			return err == nil && ok && e.Broker == C.b.Fleet().BrokerID()
		})
		if err := A.api.Disconnect(ctx, tm.SN); err != nil {
			t.Fatalf("disconnect through A: %v", err)
		}
		if !closedWithin(conn, time.Second) {
			t.Error("disconnected through A, the terminal's session on C is still open")
		}
		checkFor(t, 2*time.Second, "C's session_ended event names the operator who asked A", func() bool {
			for _, line := range strings.Split(C.logs.String(), "\n") {
				if strings.Contains(line, "event=session_ended") && strings.Contains(line, "sn="+tm.SN) && strings.Contains(line, "operator=admin") {
					return true
				}
			}
			return false
		})
		if err := A.api.Disconnect(ctx, "FLEETNOSUCH1"); !errors.Is(err, adminapi.ErrNotFound) {
			t.Errorf("disconnect of a ClientID no broker holds: %v, want not found", err)
		}
	})

	// A campaign started through A is walked by one broker of the fleet
	// (the holder of the lease "campaigns"): every terminal gets one
	// change, not one per broker.
	t.Run("CampaignWalkedOncePerFleet", func(t *testing.T) {
		t.Parallel()
		var sns []string
		for i := range 4 {
			sns = append(sns, f.register(t, i%3, fmt.Sprintf("FLEETCAMP%d", i+1)).SN)
		}
		ctx := context.Background()
		c, err := A.api.StartCampaign(ctx, adminapi.CampaignRequest{Select: "list", SNs: sns, What: "pwd", Rate: 50})
		if err != nil {
			t.Fatal(err)
		}
		// The holder of the lease finds a campaign created elsewhere within
		// 10 s.
		checkFor(t, 30*time.Second, "the campaign handled its 4 terminals", func() bool {
			got, err := A.api.Campaign(ctx, c.ID)
			return err == nil && got.Handled == len(sns)
		})
		for _, sn := range sns {
			n := 0
			for _, m := range f.members {
				for _, line := range strings.Split(m.logs.String(), "\n") {
					if strings.Contains(line, "event=change_started") && strings.Contains(line, "sn="+sn+" ") {
						n++
					}
				}
			}
			if n != 1 {
				t.Errorf("%s: %d changes started by the fleet's brokers, want 1", sn, n)
			}
			rec, err := B.b.Service().Get(ctx, sn)
			if err != nil || rec.Pending == nil {
				t.Errorf("%s: no pending change (%v)", sn, err)
			}
		}
	})

	// Terminals on each broker: every broker's list shows each of them
	// once, with the broker that holds it.
	t.Run("SessionListShowsTheWholeFleet", func(t *testing.T) {
		t.Parallel()
		want := map[string]string{}
		for i, m := range f.members {
			sn := fmt.Sprintf("FLEETLIST%d", i+1)
			tm := f.register(t, i, sn)
			if _, code := login(t, m, tm, tm.Creds.Up); code != 0 {
				t.Fatalf("login on %s: CONNACK %#x", m.name, code)
			}
			want[sn] = m.name
		}
		// A broker that answers late is left out with a warning (a loaded
		// machine): the list is asked again until it is whole, for 5 s.
		for _, m := range f.members {
			var problems []string
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
				list, err := m.api.SessionList(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				seen := map[string]int{}
				for _, s := range list.Sessions {
					seen[s.ClientID]++
				}
				problems = list.Warnings
				for id, n := range seen {
					if n > 1 {
						t.Errorf("%s lists %s %d times", m.name, id, n)
					}
				}
				for sn := range want {
					if seen[sn] != 1 {
						problems = append(problems, fmt.Sprintf("lacks %s (held by %s)", sn, want[sn]))
					}
				}
				if len(problems) == 0 || time.Now().After(deadline) {
					break
				}
			}
			if len(problems) > 0 {
				t.Errorf("%s's session list, still after 5 s: %v", m.name, problems)
			}
		}
	})

	// A terminal connected to A logs in on B (it moved; its connection to
	// A is half-open): A ends its session within 1 s.
	t.Run("MoveLeavesNoSessionBehind", func(t *testing.T) {
		t.Parallel()
		tm := f.register(t, 0, "FLEETMOVE1")
		onA, code := login(t, A, tm, tm.Creds.Up)
		if code != 0 {
			t.Fatalf("login on A: CONNACK %#x", code)
		}
		start := time.Now()
		if _, code := login(t, B, tm, tm.Creds.Up); code != 0 {
			t.Fatalf("login on B: CONNACK %#x", code)
		}
		if !closedWithin(onA, time.Second-time.Since(start)) {
			t.Error("the terminal moved to B; its session on A is still open after 1 s")
		}
		checkFor(t, time.Second, "only B holds the session", func() bool { return slices.Equal(f.holders(tm.SN), []string{B.name}) })
	})
}

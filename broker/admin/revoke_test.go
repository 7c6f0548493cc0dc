package admin_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

func (e *env) listed(clientID string) bool {
	e.t.Helper()
	ss, err := e.api.Sessions(e.t.Context())
	if err != nil {
		e.t.Fatal(err)
	}
	return slices.ContainsFunc(ss, func(s adminapi.Session) bool { return s.ClientID == clientID })
}

// dial logs terminal b in with the reference client, with or without a
// session key; it does not reconnect.
func dial(t *testing.T, addr string, b *adminapi.Bundle, sessionKey bool) *client.Client {
	t.Helper()
	rec := bundleRecord(t, b)
	c, err := client.New(client.Config{Brokers: []string{"tcp://" + addr}, Identity: rec.Identity, Alg: rec.Alg,
		Store: client.NewMemStore(rec), SessionKey: sessionKey, CleanSession: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestDisableAndDeleteEndLiveSessions (SECURITY.md, attacks tried): disable and
// delete close the terminal's live session at once — with a session key
// and in plaintext, which otherwise never ends — and its logins are
// refused afterwards.
func TestDisableAndDeleteEndLiveSessions(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		sessionKey bool
		method     string
		path       string
		status     int
	}{
		{"disable with a session key", true, "POST", "/v1/terminals/T1/disable", 200},
		{"disable in plaintext", false, "POST", "/v1/terminals/T1/disable", 200},
		{"delete with a session key", true, "DELETE", "/v1/terminals/T1", 204},
		{"delete in plaintext", false, "DELETE", "/v1/terminals/T1", 204},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			b := e.register(t1)
			c := dial(t, e.b.Addr("tcp"), b, tc.sessionKey)
			testwait.For(t, 5*time.Second, "the session listed", func() bool { return e.listed("T1") })
			if status, body := e.call(token, tc.method, tc.path, nil); status != tc.status {
				t.Fatalf("%s %s: %d %s", tc.method, tc.path, status, body)
			}
			testwait.For(t, 2*time.Second, "the live session ended (no longer listed)", func() bool { return !e.listed("T1") })
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
			defer cancel()
			if err := c.Publish(ctx, "temp", []byte("after"), 1); err == nil {
				t.Fatal("the terminal still publishes")
			}
		})
	}
}

// TestNoChangeForDisabledTerminal (SECURITY.md, attacks tried): whoever holds a
// terminal's session cannot be handed new credentials once an operator
// disabled it: disabling ends the session and cancels a pending change;
// a change cannot start while disabled; after enable the genuine device
// logs in with the values it always had.
func TestNoChangeForDisabledTerminal(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	b := e.register(t1)
	// The attacker's session: the reference client, which answers a cfg
	// with an ack on its own.
	dial(t, e.b.Addr("tcp"), b, true)
	testwait.For(t, 5*time.Second, "the session listed", func() bool { return e.listed("T1") })
	// A change pending for another, offline terminal is cancelled by the disable.
	b2 := e.register(adminapi.RegisterRequest{SN: "T2", IMEI: "354494040518571", IMSI: "460020084678121"})
	e.run([]step{
		{name: "pending before", method: "POST", path: "/v1/terminals/T2/changes", body: adminapi.ChangeRequest{What: "pwd"}, status: 202},
		{name: "disable T2", method: "POST", path: "/v1/terminals/T2/disable", status: 200, not: `"pending"`},
		{name: "cancelled", method: "GET", path: "/v1/terminals/T2/changes", status: 404},
		{name: "disable T1", method: "POST", path: "/v1/terminals/T1/disable", status: 200},
		{name: "no change while disabled", method: "POST", path: "/v1/terminals/T1/changes", body: adminapi.ChangeRequest{What: "all"}, status: 409, want: "disabled"},
		{name: "nothing pending", method: "GET", path: "/v1/terminals/T1/changes", status: 404},
	})
	// Give a wrongly delivered cfg the time to be acked and committed.
	testwait.Never(t, time.Second, "a change committed for the disabled T1", func() bool {
		rec, err := e.b.Service().Get(t.Context(), "T1")
		return err == nil && rec.LastCommitted != 0
	})
	e.run([]step{
		{name: "enable T1", method: "POST", path: "/v1/terminals/T1/enable", status: 200, not: `"last_committed"`},
		{name: "enable T2", method: "POST", path: "/v1/terminals/T2/enable", status: 200},
	})
	// The genuine devices still hold the values they were provisioned with.
	dial(t, e.b.Addr("tcp"), b, true)
	dial(t, e.b.Addr("tcp"), b2, false)
}

// TestRekeyRotatesOutOfBand: SECURITY.md's advice for a terminal whose
// secrets may have been read out — disable, rekey, write the new values
// into the device, enable — locks the holder of the old values out and
// lets the device in with the new ones.
func TestRekeyRotatesOutOfBand(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	old := e.register(t1)
	dial(t, e.b.Addr("tcp"), old, true) // the attacker's copy
	e.run([]step{{name: "disable", method: "POST", path: "/v1/terminals/T1/disable", status: 200}})
	testwait.For(t, 2*time.Second, "the session ended by the disable", func() bool { return !e.listed("T1") })
	fresh, err := e.api.RekeyTerminal(t.Context(), "T1")
	if err != nil || fresh.Up == old.Up || fresh.Down == old.Down || fresh.BK == old.BK {
		t.Fatalf("rekey: %v", err)
	}
	e.run([]step{
		{name: "still disabled", method: "GET", path: "/v1/terminals/T1", status: 200, want: `"status": "disabled"`, not: fresh.Up},
		{name: "enable", method: "POST", path: "/v1/terminals/T1/enable", status: 200},
		{name: "rekey unknown", method: "POST", path: "/v1/terminals/T9/rekey", status: 404},
	})
	rec := bundleRecord(t, old)
	c, err := client.New(client.Config{Brokers: []string{"tcp://" + e.b.Addr("tcp")}, Identity: rec.Identity, Alg: rec.Alg,
		Store: client.NewMemStore(rec), CleanSession: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err == nil {
		t.Fatal("the old values still log in")
	}
	c.Close()
	dial(t, e.b.Addr("tcp"), fresh, true)
}

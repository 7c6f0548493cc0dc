package admin_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/client"
)

// waitFor polls cond every 10 ms until it holds or timeout passes.
func waitFor(timeout time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(timeout); ; time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

func (e *env) listed(clientID string) bool {
	e.t.Helper()
	ss, err := e.api.Sessions(context.Background())
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
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
			e := newEnv(t)
			b := e.register(t1)
			c := dial(t, e.b.Addr("tcp"), b, tc.sessionKey)
			if !waitFor(5*time.Second, func() bool { return e.listed("T1") }) {
				t.Fatal("session not listed")
			}
			if status, body := e.call(token, tc.method, tc.path, nil); status != tc.status {
				t.Fatalf("%s %s: %d %s", tc.method, tc.path, status, body)
			}
			if !waitFor(2*time.Second, func() bool { return !e.listed("T1") }) {
				t.Fatal("the live session survived: still listed 2 s later")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
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
	e := newEnv(t)
	b := e.register(t1)
	// The attacker's session: the reference client, which answers a cfg
	// with an ack on its own.
	dial(t, e.b.Addr("tcp"), b, true)
	if !waitFor(5*time.Second, func() bool { return e.listed("T1") }) {
		t.Fatal("session not listed")
	}
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
	waitFor(time.Second, func() bool { return false })
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
	e := newEnv(t)
	old := e.register(t1)
	dial(t, e.b.Addr("tcp"), old, true) // the attacker's copy
	e.run([]step{{name: "disable", method: "POST", path: "/v1/terminals/T1/disable", status: 200}})
	if !waitFor(2*time.Second, func() bool { return !e.listed("T1") }) {
		t.Fatal("session survived the disable")
	}
	fresh, err := e.api.RekeyTerminal(context.Background(), "T1")
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
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err == nil {
		t.Fatal("the old values still log in")
	}
	c.Close()
	dial(t, e.b.Addr("tcp"), fresh, true)
}

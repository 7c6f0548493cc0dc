package hook_test

import (
	"context"
	"testing"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
)

// heldLookup is the registry with a Lookup that waits, once, until the
// test releases it: a login held between reading the record and
// registering its session.
type heldLookup struct {
	hook.Registry
	reached, release chan struct{}
}

func (r *heldLookup) Lookup(ctx context.Context, sn string) (*keysvc.Terminal, error) {
	t, err := r.Registry.Lookup(ctx, sn)
	if r.reached != nil {
		close(r.reached)
		r.reached = nil
		<-r.release
	}
	return t, err
}

// TestRevokeRefusesALoginInFlight: a login that read the record just before
// an operator disabled the terminal, and registers its session just after
// Revoke looked for sessions, is refused (MQTT 5 0x87) instead of
// surviving the revocation.
func TestRevokeRefusesALoginInFlight(t *testing.T) {
	t.Parallel()
	held := &heldLookup{reached: make(chan struct{}), release: make(chan struct{})}
	e := newEnv(t, func(o *hook.Options) { held.Registry = o.Registry; o.Registry = held })
	term := e.register("A00MS8011390002S", codec.HS256)
	reached := held.reached
	codes := make(chan byte, 1)
	go func() {
		_, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true)
		codes <- code
	}()
	<-reached
	if _, _, err := e.svc.Disable(t.Context(), term.sn); err != nil {
		t.Fatal(err)
	}
	if n := e.hook.Revoke(term.sn, hook.RevokeDisabled); n != 0 {
		t.Fatalf("Revoke ended %d sessions; the login had not registered one yet", n)
	}
	close(held.release)
	if code := <-codes; code != v5NotAuthorized {
		t.Fatalf("login in flight during the revocation: CONNACK 0x%02x, want 0x87", code)
	}
	if len(e.hook.Sessions()) != 0 {
		t.Fatal("a session of the revoked terminal is registered")
	}
	// Enabled again, it logs in.
	if _, err := e.svc.SetStatus(t.Context(), term.sn, keysvc.StatusActive); err != nil {
		t.Fatal(err)
	}
	if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, false), true); code != 0 {
		t.Fatalf("after enable: 0x%02x", code)
	}
}

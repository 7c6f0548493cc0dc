package hook_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/lastseen"
)

// TestLastSeenRecordsAcceptedLogins: every accepted terminal login is in
// the book with its address, MQTT version and session key; refused logins
// and applications are not.
func TestLastSeenRecordsAcceptedLogins(t *testing.T) {
	t.Parallel()
	book := lastseen.NewMemory()
	e := newEnv(t, func(o *hook.Options) { o.LastSeen = book })
	term := e.register("A00MS8011390002S", codec.HS256)
	other := e.register("B1", codec.HS256)

	if _, code := e.pahoConnect(other.sn, other.username(), []byte("wrong"), true, nil); code == 0 {
		t.Fatal("a wrong password was accepted")
	}
	if _, ok := book.Get(other.sn); ok {
		t.Fatal("a refused login was recorded")
	}
	before := e.clock.now()
	c, code := e.pahoConnect(term.sn, term.username(), e.login(term, false), true, nil)
	if code != 0 {
		t.Fatalf("login: CONNACK %d", code)
	}
	got, ok := book.Get(term.sn)
	if !ok || got.Protocol != 4 || got.SessionKey || !strings.HasPrefix(got.Remote, "127.0.0.1:") || got.At.Before(before.Truncate(1)) {
		t.Fatalf("after a 3.1.1 login without a key: %+v %t", got, ok)
	}
	c.Disconnect(50)

	v5, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), true)
	if code != 0 {
		t.Fatalf("v5 login: CONNACK 0x%02x", code)
	}
	defer v5.conn.Close()
	if got, _ := book.Get(term.sn); got.Protocol != 5 || !got.SessionKey {
		t.Fatalf("after an MQTT 5 login with a key: %+v", got)
	}
	e.addApp("dash")
	if _, code := e.pahoConnect("dash-1", "dash", []byte("app-password-dash"), true, nil); code != 0 {
		t.Fatalf("app login: %d", code)
	}
	if n := book.Stats().Entries; n != 1 {
		t.Fatalf("%d entries, want the one terminal", n)
	}
}

// TestOperatorInEvents: sessions an operator ends and changes an operator
// starts name the operator in their security events.
func TestOperatorInEvents(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	term := e.register("A1", codec.HS256)
	if _, code := e.pahoConnect(term.sn, term.username(), e.login(term, false), true, nil); code != 0 {
		t.Fatalf("login: %d", code)
	}
	testwait.For(t, 10*time.Second, "the session", func() bool { return len(e.hook.Sessions()) == 1 })
	if _, err := e.hook.StartChangeBy(t.Context(), term.sn, codec.WhatPwd, "alice"); err != nil {
		t.Fatal(err)
	}
	if n := e.hook.RevokeBy(term.sn, hook.RevokeDisabled, "bob"); n != 1 {
		t.Fatalf("RevokeBy ended %d sessions", n)
	}
	var started, ended map[string]any
	for line := range strings.SplitSeq(e.logs.String(), "\n") {
		var ev map[string]any
		if json.Unmarshal([]byte(line), &ev) != nil {
			continue
		}
		switch ev["event"] {
		case "change_started":
			started = ev
		case "session_ended":
			ended = ev
		}
	}
	if started["operator"] != "alice" || started["origin"] != "operator" {
		t.Errorf("change_started %v, want operator alice", started)
	}
	if ended["operator"] != "bob" || ended["reason"] != hook.RevokeDisabled {
		t.Errorf("session_ended %v, want operator bob", ended)
	}
}

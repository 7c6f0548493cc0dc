package hook

import (
	"sync"
	"testing"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// TestSessionAEADBuiltOnce: the AEAD of a session key is built on first
// use, once, whichever goroutine (the terminal's read loop opening, a
// publisher's sealing) gets there first.
func TestSessionAEADBuiltOnce(t *testing.T) {
	s := &session{kind: kindTerminal, key: make([]byte, 32)}
	if !s.hasKey() || s.aeadInst != nil {
		t.Fatal("a fresh session with a key must not have built its AEAD yet")
	}
	var wg sync.WaitGroup
	got := make([]any, 8)
	for i := range got {
		wg.Go(func() { got[i] = s.aead() })
	}
	wg.Wait()
	for _, a := range got {
		if a == nil || a != got[0] {
			t.Fatalf("aead() returned %v and %v, want one instance", a, got[0])
		}
	}
	if bad := (&session{key: make([]byte, 7)}).aead(); bad != nil {
		t.Error("a key of the wrong size made an AEAD")
	}
	if (&session{}).hasKey() {
		t.Error("a session without a key reports one")
	}
}

// TestTerminalSessionTopics: the two topics cut from one string are the
// codec's key topic and down filter.
func TestTerminalSessionTopics(t *testing.T) {
	for _, sn := range []string{"A", "A00MS8011390002S"} {
		s := newTerminalSession(&keysvc.Terminal{SN: sn})
		if s.keyTopic != codec.KeyTopic(sn) || s.downFilter != codec.DownTopic(sn, "#") {
			t.Errorf("sn %s: topics %q and %q, want %q and %q", sn, s.keyTopic, s.downFilter, codec.KeyTopic(sn), codec.DownTopic(sn, "#"))
		}
	}
}

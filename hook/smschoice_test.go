package hook_test

import (
	"testing"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

// TestSMSNotChosenWhenCipherPossible (SECURITY.md, attacks tried): a terminal whose
// basic key is in sync asks for its change by SMS; the platform sends the
// new values in ciphertext (cfg) and nothing crosses the SMS bearer in
// plaintext — unless an operator policy explicitly honours such requests.
func TestSMSNotChosenWhenCipherPossible(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		policy   bool
		wantKind string
	}{
		{"default policy: ciphertext", false, "cfg"},
		{"operator allows SMS on request", true, "acc"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			gw, err := smstest.Start("127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer gw.Close()
			e := newEnv(t, func(o *hook.Options) { o.SMS = newSender(gw.URL()); o.SMSOnRequest = tc.policy })
			term := e.register("A00MS8011390002S", codec.HS256, func(r *keysvc.RegisterRequest) { r.MSISDN = "8613800000001" })
			c, _ := loginWithKey(t, e, term, true) // bkd matched: the basic key is in sync
			c.publish("$m2m/"+term.sn+"/ctl", term.chg("all", "sms", e.ts(), nonce()), 1)
			if f := keyMessage(t, c, term); f[1] != tc.wantKind {
				t.Fatalf("got %v, want %s", f, tc.wantKind)
			}
			if !tc.policy {
				if n := len(gw.Messages()); n != 0 {
					t.Fatalf("%d SMS sent although the basic key is in sync", n)
				}
				if got := e.counter("m2mguard_changes_total", "event", "delivered", "detail", "cipher"); got != 1 {
					t.Fatalf("delivered in ciphertext: %v, want 1", got)
				}
			}
		})
	}
}

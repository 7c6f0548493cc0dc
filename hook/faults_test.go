package hook_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

// heldTerminal is what a terminal holds across changes: its current values
// and, between a cfg (or SMS) and the done, the pending new ones. It logs
// in with the pending values first and falls back to the current ones
// (SPEC section 7: nothing may lock a terminal out).
type heldTerminal struct {
	cur     specTerminal
	pend    *specTerminal
	pendRID string
}

// login connects with what the terminal holds, subscribed to its key
// topic, or returns nil if every value it holds was refused. With a change
// pending it resolves whether the platform committed it: a login accepted
// with a new up proves it; for a bk-only change (same up) the session key
// tells (it unwraps under the new bk only if committed), else the terminal
// sends its ack again: done commits, unknown-rid drops the change.
func (h *heldTerminal) login(e *env) *v5Client {
	if h.pend != nil {
		c, code := dialV5(e.t, e.addr, h.cur.sn, h.cur.username(), e.login(*h.pend, true), true)
		if code == 0 {
			c.subscribe("$m2m/"+h.cur.sn+"/key", 0)
			if h.pend.up != h.cur.up {
				h.cur, h.pend = *h.pend, nil
				return c
			}
			if pk, err := c.nextPublish(2 * time.Second); err == nil {
				if _, _, err := h.pend.sessionKey(string(pk.Payload)); err == nil {
					h.cur, h.pend = *h.pend, nil
					return c
				}
			}
			h.resendAck(e, c)
			return c
		}
		if h.pend.up != h.cur.up {
			h.pend = nil // the new up is refused: the change is gone; keep the old values
		}
	}
	c, code := dialV5(e.t, e.addr, h.cur.sn, h.cur.username(), e.login(h.cur, true), true)
	if code != 0 {
		return nil
	}
	c.subscribe("$m2m/"+h.cur.sn+"/key", 0)
	if h.pend != nil {
		h.resendAck(e, c)
	}
	return c
}

// resendAck asks the platform about the pending change by acknowledging it
// again.
func (h *heldTerminal) resendAck(e *env, c *v5Client) {
	bkChanged := string(h.pend.bk) != string(h.cur.bk)
	c.publish("$m2m/"+h.cur.sn+"/ctl", h.cur.ack(*h.pend, h.pendRID, bkChanged, e.ts(), nonce()), 1)
	for {
		pk, err := c.nextPublish(2 * time.Second)
		if err != nil {
			return // no answer: keep holding both
		}
		msg := string(pk.Payload)
		if _, err := h.pend.verifyDown(msg); err == nil && strings.HasPrefix(msg, "M2M1.done.") {
			h.cur, h.pend = *h.pend, nil
			return
		}
		if f, err := h.cur.verifyDown(msg); err == nil && f[1] == "err" {
			if f[4] == "unknown-rid" {
				h.pend = nil
			}
			return
		}
	}
}

type faultStats struct {
	attempts, logins, lockouts, disagreements, commits int
	faults                                             map[string]int
}

// TestRandomizedChangesWithFaults drives 1,000 change attempts (either side,
// both modes) with injected faults — lost cfg, ack or done, the broker
// killed before or after the ack, deadline expiry, SMS gateway failures —
// and after each one requires that the terminal logs in with the values it
// holds and that store and terminal agree. The attempts run in
// faultShards shards side by side, each with a broker, store, gateway and
// terminal of its own and a seed of its own (the base seed plus the
// shard's number, in the shard's name). M2MGUARD_FAULT_SEED and
// M2MGUARD_FAULT_ATTEMPTS override the base seed and the total count.
func TestRandomizedChangesWithFaults(t *testing.T) {
	t.Parallel()
	seed, attempts := uint64(20261128), 1000
	if s, err := strconv.ParseUint(os.Getenv("M2MGUARD_FAULT_SEED"), 10, 64); err == nil {
		seed = s
	}
	if n, err := strconv.Atoi(os.Getenv("M2MGUARD_FAULT_ATTEMPTS")); err == nil {
		attempts = n
	}
	var mu sync.Mutex
	total := faultStats{faults: map[string]int{}}
	t.Run("shards", func(t *testing.T) { // returns when every shard has
		for k := range faultShards {
			n := attempts / faultShards
			if k < attempts%faultShards {
				n++
			}
			t.Run(fmt.Sprintf("seed-%d", seed+uint64(k)), func(t *testing.T) {
				t.Parallel()
				st := randomizedChanges(t, seed+uint64(k), n)
				mu.Lock()
				defer mu.Unlock()
				total.add(st)
			})
		}
	})
	t.Logf("seeds %d to %d: %d attempts, %d logins, %d lockouts, %d disagreements, %d changes committed and confirmed by done; faults %s",
		seed, seed+faultShards-1, total.attempts, total.logins, total.lockouts, total.disagreements, total.commits, fmtFaults(total.faults))
	if total.commits == 0 {
		t.Fatal("no change completed: the test exercised nothing")
	}
}

// faultShards is the number of shards TestRandomizedChangesWithFaults
// splits its attempts into.
const faultShards = 4

func (s *faultStats) add(o faultStats) {
	s.attempts += o.attempts
	s.logins += o.logins
	s.lockouts += o.lockouts
	s.disagreements += o.disagreements
	s.commits += o.commits
	for k, v := range o.faults {
		s.faults[k] += v
	}
}

// randomizedChanges runs attempts change attempts of
// TestRandomizedChangesWithFaults with seed on a broker of its own, and
// fails t at a lockout or a disagreement.
func randomizedChanges(t *testing.T, seed uint64, attempts int) faultStats {
	rng := rand.New(rand.NewPCG(seed, seed))
	// quiet is how long a silent platform means "nothing more is coming";
	// the platform answers on loopback within a millisecond.
	quiet := 100 * time.Millisecond
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()

	store, again := backends()[0].open(t)
	tuneSvc := func(o *keysvc.Options) { o.PasswordLifetime = 0 } // expiry of passwords is not under test here
	tune := func(o *hook.Options) { o.SMS = newSender(gw.URL()); o.SMSRetry = 5 * time.Millisecond }
	e := newEnvOn(t, store, tuneSvc, tune)
	reg := e.register("FAULT1", codec.HS256, func(r *keysvc.RegisterRequest) { r.MSISDN = "8613800000009" })
	h := &heldTerminal{cur: reg}
	st := faultStats{faults: map[string]int{}}
	faults := []string{"none", "lose-cfg", "lose-ack", "lose-done", "kill-before-ack", "kill-after-ack", "expire", "gateway-fails"}
	whats := []string{"pwd", "bk", "all"}
	var smsSeen int

	for i := 0; i < attempts; i++ {
		st.attempts++
		fault := faults[rng.IntN(len(faults))]
		st.faults[fault]++
		c := h.login(e)
		if c == nil {
			st.lockouts++
			t.Fatalf("attempt %d (%s): terminal locked out", i, fault)
		}
		st.logins++

		// Start a change: the terminal asks (cipher or SMS) or the platform does.
		if fault == "gateway-fails" {
			gw.FailNext(1 + rng.IntN(3))
		}
		what := whats[rng.IntN(len(whats))]
		switch rng.IntN(3) {
		case 0:
			c.publish("$m2m/"+h.cur.sn+"/ctl", h.cur.chg(what, "cipher", e.ts(), nonce()), 1)
		case 1:
			c.publish("$m2m/"+h.cur.sn+"/ctl", h.cur.chg(what, "sms", e.ts(), nonce()), 1)
		default:
			e.hook.StartChange(t.Context(), h.cur.sn, codec.What(what)) // busy is fine
		}

		// React to what the platform sends, with the fault.
		restart := func() {
			e.stop()
			e.start(again(), tuneSvc, tune)
		}
		for done := false; !done; {
			pk, err := c.nextPublish(quiet)
			if err != nil {
				break // nothing more: the attempt ends here
			}
			msg := string(pk.Payload)
			var rid, params string
			switch {
			case h.pend != nil && strings.HasPrefix(msg, "M2M1.done."):
				if _, err := h.pend.verifyDown(msg); err == nil && fault != "lose-done" {
					h.cur, h.pend = *h.pend, nil
					st.commits++
				}
				done = true
				continue
			case strings.HasPrefix(msg, "M2M1.cfg."):
				if rid, params, err = h.cur.cfg(msg); err != nil {
					t.Fatalf("attempt %d: cfg: %v", i, err)
				}
			case strings.HasPrefix(msg, "M2M1.acc."):
				f, err := h.cur.verifyDown(msg)
				if err != nil {
					t.Fatalf("attempt %d: acc: %v", i, err)
				}
				rid = f[4]
				// Wait for the SMS of rid; one that came in an earlier attempt
				// was lost then (the platform sends it once) and stays lost.
				lost := false
				testwait.Until(3*time.Second, func() bool {
					for j, m := range gw.Messages() {
						if p, err := h.cur.smsText(m.Text, rid); err == nil {
							params, lost = p, j < smsSeen
						}
					}
					return params != "" || lost
				})
				smsSeen = len(gw.Messages())
				if lost {
					params = ""
				}
				if params == "" {
					done = true // the SMS did not come in time; the change waits
					continue
				}
			default:
				continue // sk, err
			}
			if fault == "lose-cfg" {
				done = true
				continue
			}
			next, err := h.cur.applyParams(params)
			if err != nil {
				t.Fatalf("attempt %d: params: %v", i, err)
			}
			h.pend, h.pendRID = &next, rid // stored before the ack, as a terminal must
			e.secrets = append(e.secrets, []byte(next.up), []byte(next.down), next.bk)
			bkChanged := string(next.bk) != string(h.cur.bk)
			switch fault {
			case "lose-ack":
				done = true
			case "kill-before-ack":
				restart()
				done = true
			case "expire":
				e.clock.advance(25 * time.Hour)
				e.hook.ExpireChanges(t.Context())
				done = true
			case "kill-after-ack":
				c.publish("$m2m/"+h.cur.sn+"/ctl", h.cur.ack(next, rid, bkChanged, e.ts(), nonce()), 0)
				restart()
				done = true
			default:
				c.publish("$m2m/"+h.cur.sn+"/ctl", h.cur.ack(next, rid, bkChanged, e.ts(), nonce()), 1)
			}
		}
		c.conn.Close()

		// The terminal must get in with what it holds, and then agree with the store.
		c = h.login(e)
		if c == nil {
			st.lockouts++
			t.Fatalf("attempt %d (%s): terminal locked out after the attempt", i, fault)
		}
		st.logins++
		c.conn.Close()
		rec, err := e.svc.Get(t.Context(), h.cur.sn)
		if err != nil {
			t.Fatal(err)
		}
		if string(rec.Creds.Up) != h.cur.up || string(rec.Creds.Down) != h.cur.down || string(rec.Creds.BK) != string(h.cur.bk) {
			st.disagreements++
			t.Errorf("attempt %d (%s): store and terminal disagree", i, fault)
		}
		if rec.Pending != nil && rng.IntN(4) == 0 {
			e.clock.advance(25 * time.Hour) // let stale changes expire now and then
			e.hook.ExpireChanges(t.Context())
		}
	}
	t.Logf("seed %d: %d attempts, %d logins, %d lockouts, %d disagreements, %d changes committed and confirmed by done; faults %s",
		seed, st.attempts, st.logins, st.lockouts, st.disagreements, st.commits, fmtFaults(st.faults))
	if st.lockouts != 0 || st.disagreements != 0 {
		t.Fatalf("%d lockouts, %d disagreements", st.lockouts, st.disagreements)
	}
	return st
}

func fmtFaults(m map[string]int) string {
	var parts []string
	for _, k := range []string{"none", "lose-cfg", "lose-ack", "lose-done", "kill-before-ack", "kill-after-ack", "expire", "gateway-fails"} {
		parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
	}
	return strings.Join(parts, " ")
}

package hook_test

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
)

// backend opens the store of a test and can open it again, as a restarted
// broker (or a second broker) would.
type backend struct {
	name string
	open func(t *testing.T) (store keysvc.Store, again func() keysvc.Store)
}

func backends() []backend {
	return []backend{
		{"embedded", func(t *testing.T) (keysvc.Store, func() keysvc.Store) {
			key := make([]byte, 32)
			rand.Read(key)
			path := filepath.Join(t.TempDir(), "m2mguard.db")
			var current *boltstore.Store
			open := func() keysvc.Store {
				if current != nil {
					current.Close() // one process at a time holds the file
				}
				// NoSync: a broker these tests kill is a process, whose writes
				// the OS keeps; only a crash of the machine needs the fsync.
				s, err := boltstore.Open(path, boltstore.Options{MasterKey: key, NoSync: true})
				if err != nil {
					t.Fatal(err)
				}
				current = s
				t.Cleanup(func() { s.Close() })
				return s
			}
			return open(), open
		}},
		{"vault", func(t *testing.T) (keysvc.Store, func() keysvc.Store) {
			v := vaulttest.Start(t)
			policy, err := os.ReadFile(filepath.Join("..", "deploy", "vault", "broker.hcl"))
			if err != nil {
				t.Fatal(err)
			}
			token := v.TokenWithPolicy(t, "m2mguard-broker", string(policy))
			open := func() keysvc.Store {
				s, err := vaultstore.Open(t.Context(), vaultstore.Options{Address: v.Addr, Token: token})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { s.Close() })
				return s
			}
			return open(), open
		}},
	}
}

// requestChange sends chg in ciphertext and returns the rid and the
// terminal with the new values from cfg (not yet acknowledged).
func requestChange(t *testing.T, e *env, c *v5Client, term specTerminal, what string) (string, specTerminal) {
	t.Helper()
	c.publish("$m2m/"+term.sn+"/ctl", term.chg(what, "cipher", e.ts(), nonce()), 1)
	pk, err := c.nextPublish(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	rid, params, err := term.cfg(string(pk.Payload))
	if err != nil {
		t.Fatalf("cfg: %v", err)
	}
	next, err := term.applyParams(params)
	if err != nil {
		t.Fatal(err)
	}
	e.secrets = append(e.secrets, []byte(next.up), []byte(next.down), next.bk)
	return rid, next
}

// TestChangesOnBothStores runs the credential-change paths of SPEC
// section 7 against the embedded store and against a real Vault.
func TestChangesOnBothStores(t *testing.T) {
	t.Parallel()
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			t.Run("CipherChangeAndAck", func(t *testing.T) {
				t.Parallel()
				store, _ := b.open(t)
				e := newEnvOn(t, store, nil, nil)
				term := e.register("A00MS8011390002S", codec.MD5)
				c, _ := loginWithKey(t, e, term, true)
				rid, next := requestChange(t, e, c, term, "all")
				c.publish("$m2m/"+term.sn+"/ctl", term.ack(next, rid, true, e.ts(), nonce()), 1)
				if f := keyMessage(t, c, next); f[1] != "done" {
					t.Fatalf("got %v, want done", f)
				}
				if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(next, true), true); code != 0 {
					t.Fatalf("new values: 0x%02x", code)
				}
			})
			t.Run("AckLostLoginCommits", func(t *testing.T) {
				t.Parallel()
				store, _ := b.open(t)
				e := newEnvOn(t, store, nil, nil)
				term := e.register("A00MS8011390002S", codec.HS256)
				c, _ := loginWithKey(t, e, term, true)
				_, next := requestChange(t, e, c, term, "pwd")
				c.conn.Close() // the ack never leaves
				if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(next, false), true); code != 0 {
					t.Fatalf("login with the pending values: 0x%02x", code)
				}
				rec, err := e.svc.Get(t.Context(), term.sn)
				if err != nil || rec.Pending != nil || string(rec.Creds.Up) != next.up {
					t.Fatalf("not committed by the login (%v)", err)
				}
				// Counted as every commit is.
				if got := e.counter("m2mguard_changes_total", "event", "committed", "detail", "login"); got != 1 {
					t.Fatalf("commits by login counted: %v, want 1", got)
				}
			})
			t.Run("BrokerKilledBetweenCfgAndAck", func(t *testing.T) {
				t.Parallel()
				for _, resume := range []string{"new values", "old values"} {
					t.Run(resume, func(t *testing.T) {
						t.Parallel()
						store, again := b.open(t)
						e := newEnvOn(t, store, nil, nil)
						term := e.register("A00MS8011390002S", codec.HS256)
						c, _ := loginWithKey(t, e, term, true)
						rid, next := requestChange(t, e, c, term, "pwd")
						e.stop()
						e.start(again(), nil, nil)

						if resume == "new values" {
							if _, code := dialV5(t, e.addr, term.sn, term.username(), e.login(next, false), true); code != 0 {
								t.Fatalf("new values after the restart: 0x%02x", code)
							}
						} else {
							// The terminal falls back to its old values; the change
							// is delivered again and completes.
							c2, code := dialV5(t, e.addr, term.sn, term.username(), e.login(term, true), true)
							if code != 0 {
								t.Fatalf("old values after the restart: 0x%02x", code)
							}
							c2.subscribe("$m2m/"+term.sn+"/key", 0)
							var gotCfg bool
							for i := 0; i < 2 && !gotCfg; i++ {
								gotCfg = keyMessage(t, c2, term)[1] == "cfg"
							}
							if !gotCfg {
								t.Fatal("change not delivered again after the restart")
							}
							c2.publish("$m2m/"+term.sn+"/ctl", term.ack(next, rid, false, e.ts(), nonce()), 1)
							if f := keyMessage(t, c2, next); f[1] != "done" {
								t.Fatalf("got %v, want done", f)
							}
						}
						rec, err := e.svc.Get(t.Context(), term.sn)
						if err != nil || rec.Pending != nil || string(rec.Creds.Up) != next.up {
							t.Fatalf("store and terminal disagree after the restart (%v)", err)
						}
					})
				}
			})
		})
	}
}

// TestTwoBrokersRaceToCommit: two brokers on one Vault; the terminal's ack
// reaches one while its login with the new values reaches the other. Both
// succeed (the commit is idempotent), the store holds one committed change,
// and the terminal is never locked out.
func TestTwoBrokersRaceToCommit(t *testing.T) {
	t.Parallel()
	b := backends()[1]
	for round := 0; round < 5; round++ {
		store, again := b.open(t)
		a := newEnvOn(t, store, nil, nil)
		other := newEnvOn(t, again(), nil, nil)
		other.clock = a.clock
		term := a.register("RACE"+string(rune('A'+round)), codec.HS256)
		c, _ := loginWithKey(t, a, term, true)
		rid, next := requestChange(t, a, c, term, "pwd")
		other.secrets = a.secrets

		var wg sync.WaitGroup
		var loginCode byte
		wg.Add(2)
		go func() {
			defer wg.Done()
			c.publish("$m2m/"+term.sn+"/ctl", term.ack(next, rid, false, a.ts(), nonce()), 1)
		}()
		go func() {
			defer wg.Done()
			_, loginCode = dialV5(t, other.addr, term.sn, term.username(), other.login(next, false), true)
		}()
		wg.Wait()
		if loginCode != 0 {
			t.Fatalf("round %d: login with the new values on the other broker: 0x%02x", round, loginCode)
		}
		if f := keyMessage(t, c, next); f[1] != "done" {
			t.Fatalf("round %d: ack on the first broker: got %v, want done", round, f)
		}
		rec, err := other.svc.Get(t.Context(), term.sn)
		if err != nil || rec.Pending != nil || rec.LastCommitted.String() != rid || string(rec.Creds.Up) != next.up {
			t.Fatalf("round %d: store not committed once with the new values (%v)", round, err)
		}
	}
}

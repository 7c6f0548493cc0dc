package hook_test

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/lastseen"
)

// Allocation budgets of one terminal CONNECT through the hook (OnConnect,
// and OnDisconnect for an accepted one), as the broker runs it: the key
// service's cache, the in-memory replay guard and throttle, a last-seen
// table, events formatted as JSON. An accepted login with a session key
// was 52 allocations before the login path was trimmed; the refusal of a
// wrong digest 18. Each allocation is garbage the broker collects per
// connect: raise a budget only with a reason.
const (
	loginAllocBudget   = 15
	refusalAllocBudget = 5
)

// TestLoginAllocs counts, with testing.AllocsPerRun (deterministic, no
// clock), the allocations of an accepted login with a session key and of
// a refused one (a wrong digest, from a fresh address each time). It is
// not parallel: AllocsPerRun counts the whole process's allocations. The
// race detector's instrumentation moves a few values to the heap: its
// counts are not the broker's, and the test skips.
func TestLoginAllocs(t *testing.T) {
	if raceDetector {
		t.Skip("allocation counts differ under the race detector")
	}
	e := newEnv(t, func(o *hook.Options) {
		o.Logger = slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelInfo}))
		o.LastSeen = lastseen.NewMemory()
	})
	term := e.register("ALLOC1", codec.HS256)
	conn, peer := net.Pipe()
	defer peer.Close()
	defer conn.Close()
	cl := e.server.NewClient(discardConn{conn}, "tcp", term.sn, false)
	cl.Properties.ProtocolVersion = 4
	user := []byte(term.username())
	connect := func(password []byte) packets.Packet {
		return packets.Packet{Connect: packets.ConnectParams{ClientIdentifier: term.sn,
			UsernameFlag: true, Username: user, PasswordFlag: true, Password: password}}
	}
	const runs = 200

	t.Run("accepted", func(t *testing.T) {
		tokens := make([]packets.Packet, runs+1) // AllocsPerRun runs f once more to warm up
		for i := range tokens {
			tokens[i] = connect(e.login(term, true))
		}
		var failed error
		allocs := testing.AllocsPerRun(runs, func() {
			pk := tokens[0]
			tokens = tokens[1:]
			if err := e.hook.OnConnect(cl, pk); err != nil {
				failed = err
				return
			}
			e.hook.OnDisconnect(cl, nil, true)
		})
		if failed != nil {
			t.Fatalf("login refused: %v", failed)
		}
		if allocs > loginAllocBudget {
			t.Errorf("an accepted login with a session key allocates %.0f times, budget %d", allocs, loginAllocBudget)
		}
		t.Logf("accepted login: %.0f allocations", allocs)
	})

	t.Run("bad digest", func(t *testing.T) {
		tokens := make([]packets.Packet, runs+1)
		remotes := make([]string, runs+1)
		for i := range tokens {
			pw := e.login(term, true)
			pw[len(pw)-1] ^= 1 // '0'..'9' and 'a'..'f' stay hex digits
			tokens[i] = connect(pw)
			remotes[i] = fmt.Sprintf("192.0.2.%d:%d", 1+i%250, 40000+i)
		}
		var failed bool
		allocs := testing.AllocsPerRun(runs, func() {
			cl.Net.Remote = remotes[0]
			pk := tokens[0]
			tokens, remotes = tokens[1:], remotes[1:]
			failed = failed || e.hook.OnConnect(cl, pk) == nil
		})
		if failed {
			t.Fatal("a wrong digest was accepted")
		}
		if allocs > refusalAllocBudget {
			t.Errorf("refusing a wrong digest allocates %.0f times, budget %d", allocs, refusalAllocBudget)
		}
		t.Logf("refused login: %.0f allocations", allocs)
	})
}

// discardConn is a net.Conn whose writes vanish (the sk message, a
// refusal's CONNACK) and whose remote address is a TCP one, as a
// listener's connections have.
type discardConn struct{ net.Conn }

func (discardConn) Write(p []byte) (int, error) { return len(p), nil }

func (discardConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 40000}
}

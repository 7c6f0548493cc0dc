package broker_test

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/internal/freeport"
	"github.com/m2mguard/m2mguard/internal/haproxytest"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

const shippedHAProxyCfg = "../deploy/haproxy/haproxy.cfg"

// haproxyPEM writes the test certificate and its key into one PEM file,
// as HAProxy's crt wants them, and returns its path and a trusting pool.
func haproxyPEM(t *testing.T) (string, func() *tls.Config) {
	t.Helper()
	certFile, keyFile, pool := tlsFiles(t)
	cert, err := os.ReadFile(certFile)
	if err != nil {
		t.Fatal(err)
	}
	key, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	pem := filepath.Join(t.TempDir(), "mqtt.pem")
	if err := os.WriteFile(pem, append(cert, key...), 0o600); err != nil {
		t.Fatal(err)
	}
	return pem, func() *tls.Config {
		return &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	}
}

func shippedHAProxy(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(shippedHAProxyCfg)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// TestHAProxyConfigValid: `haproxy -c` accepts deploy/haproxy/haproxy.cfg
// without a warning, with a test certificate in place of the shipped
// path and the brokers' host names replaced by loopback addresses (so
// that the check resolves no name).
func TestHAProxyConfigValid(t *testing.T) {
	t.Parallel()
	pem, _ := haproxyPEM(t)
	cfg := haproxytest.Derive(t, shippedHAProxy(t),
		"/etc/haproxy/certs/mqtt.pem", pem,
		"broker1:", "127.0.0.11:", "broker2:", "127.0.0.12:", "broker3:", "127.0.0.13:")
	file := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := haproxytest.Check(t, file)
	if err == nil {
		err = haproxytest.Valid(out)
	}
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
}

// TestHAProxyFleet (README, "Load balancing") runs HAProxy on a copy of the shipped
// configuration (same frontends, hash rules, checks and PROXY v2; only
// addresses, the certificate path, maxconn and a shorter check interval
// changed)
// in front of three brokers that trust 127.0.0.1 for the PROXY protocol,
// and checks what the deployment promises:
//   - the same ClientID always lands on the same broker, over TCP and
//     TLS, from either client address, and the ClientIDs spread over the
//     brokers;
//   - the brokers see the clients' own addresses (127.0.0.2, 127.0.0.3):
//     in the session list, and in the login throttle, where failures of
//     127.0.0.2 through HAProxy do not throttle 127.0.0.3 on the same
//     broker;
//   - WebSocket through HAProxy reaches a broker with the client's address;
//   - HAProxy's health checks (LOCAL) are accepted, and a PROXY header
//     sent to a broker directly from an untrusted address is refused.
func TestHAProxyFleet(t *testing.T) {
	t.Parallel()
	haproxytest.Binary(t) // skip early, before starting brokers, if there is none
	pw := []byte("fleet-password-0123")
	brokers := make([]*broker.Broker, 3)
	for i := range brokers {
		cfg := proxiedConfig(t, "127.0.0.1/32")
		cfg.MQTT.WS = "127.0.0.1:0"
		cfg.Auth.AppFailuresPerAddr = 1
		cfg.Auth.AppFailureRefill = time.Hour
		cfg.Auth.AppRatePerAddr = 1000 // the test logs in often from two addresses
		b, _ := start(t, cfg)
		addApp(t, b, "fleet", pw)
		brokers[i] = b
	}
	pem, tlsConf := haproxyPEM(t)
	mqttAddr, mqttsAddr, wsAddr, wssAddr := freeport.Addr(t), freeport.Addr(t), freeport.Addr(t), freeport.Addr(t)
	cfg := haproxytest.Derive(t, shippedHAProxy(t),
		"bind :1883\n", "bind "+mqttAddr+"\n",
		"bind :8883 ssl", "bind "+mqttsAddr+" ssl",
		"bind :8083\n", "bind "+wsAddr+"\n",
		"bind :8084 ssl", "bind "+wssAddr+" ssl",
		"/etc/haproxy/certs/mqtt.pem", pem,
		"server broker1 broker1:1883", "server broker1 "+brokers[0].Addr("tcp"),
		"server broker2 broker2:1883", "server broker2 "+brokers[1].Addr("tcp"),
		"server broker3 broker3:1883", "server broker3 "+brokers[2].Addr("tcp"),
		"server broker1 broker1:8083", "server broker1 "+brokers[0].Addr("ws"),
		"server broker2 broker2:8083", "server broker2 "+brokers[1].Addr("ws"),
		"server broker3 broker3:8083", "server broker3 "+brokers[2].Addr("ws"),
		// No name to resolve here: no resolvers (nothing leaves the machine).
		"resolvers dns\n    parse-resolv-conf\n    hold valid 10s\n", "",
		" resolvers dns init-addr last,libc,none", "",
		"check inter 5s", "check inter 200ms",
		"maxconn 100000", "maxconn 1000", // HAProxy raises the FD limit to fit maxconn; a test machine's is lower
	)
	hp := haproxytest.Start(t, cfg)
	testwait.For(t, 15*time.Second, "HAProxy listening", func() bool {
		c, err := net.Dial("tcp", mqttAddr)
		if err == nil {
			c.Close()
		}
		return err == nil || hp.Exited()
	})
	if hp.Exited() {
		t.Fatalf("haproxy exited:\n%s", hp.Log())
	}

	// session finds the broker holding clientID's session and its remote.
	session := func(clientID string) (int, string) {
		for i, b := range brokers {
			for _, s := range b.Hook().Sessions() {
				if s.ClientID == clientID {
					return i, s.Remote
				}
			}
		}
		return -1, ""
	}
	dial := func(from string, useTLS bool) net.Conn {
		if !useTLS {
			return dialFrom(t, from, mqttAddr, nil)
		}
		c := tls.Client(dialFrom(t, from, mqttsAddr, nil), tlsConf())
		t.Cleanup(func() { c.Close() })
		return c
	}

	t.Run("ClientID pinned to one broker, client address seen", func(t *testing.T) {
		ids := []string{"fleet-A00MS8011390002S", "fleet-1", "fleet-2", "fleet-3", "fleet-backup", "fleet-east", "fleet-west", "fleet-x9", "fleet-0042"}
		landed := map[string]map[int]bool{}
		used := map[int]bool{}
		for round, via := range []struct {
			from   string
			useTLS bool
		}{{"127.0.0.2", false}, {"127.0.0.3", true}, {"127.0.0.3", false}, {"127.0.0.2", true}} {
			for _, id := range ids {
				c := dial(via.from, via.useTLS)
				appConnect(t, c, id, "fleet", pw, "m2m/+/up/#")
				i, remote := session(id)
				if i < 0 {
					t.Fatalf("round %d: %s logged in but no broker holds its session", round, id)
				}
				if !strings.HasPrefix(remote, via.from+":") {
					t.Fatalf("round %d: %s from %s: the broker sees %s", round, id, via.from, remote)
				}
				if landed[id] == nil {
					landed[id] = map[int]bool{}
				}
				landed[id][i], used[i] = true, true
				c.Close()
				testwait.For(t, 10*time.Second, id+"'s session ended", func() bool { j, _ := session(id); return j < 0 })
			}
		}
		for id, on := range landed {
			if len(on) != 1 {
				t.Errorf("%s landed on brokers %v over 4 connections, want one", id, on)
			}
		}
		if len(used) < 2 {
			t.Errorf("%d ClientIDs all landed on broker(s) %v", len(ids), used)
		}
		t.Logf("%d ClientIDs over brokers %v", len(ids), landed)
	})

	t.Run("throttle keys on the client address", func(t *testing.T) {
		// One ClientID, so one broker: 127.0.0.2 uses up its one allowed
		// failure, 127.0.0.3 behind the same HAProxy keeps its own.
		for i, want := range []byte{0x86, 0x8A} {
			if got := appConnectCode(t, dial("127.0.0.2", false), "fleet-guess", "fleet"); got != want {
				t.Fatalf("failed login %d from 127.0.0.2 through HAProxy: CONNACK 0x%02x, want 0x%02x", i+1, got, want)
			}
		}
		if got := appConnectCode(t, dial("127.0.0.3", false), "fleet-guess", "fleet"); got != 0x86 {
			t.Fatalf("first failed login from 127.0.0.3 through the same HAProxy to the same broker: CONNACK 0x%02x, want 0x86", got)
		}
	})

	t.Run("WebSocket", func(t *testing.T) {
		d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 10 * time.Second,
			NetDial: func(network, addr string) (net.Conn, error) {
				// 127.0.0.4: source hashing would send 127.0.0.3 to the
				// broker where its failed login above counts.
				nd := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.4")}}
				return nd.Dial(network, addr)
			}}
		for _, url := range []string{"ws://" + wsAddr + "/mqtt", "wss://" + wssAddr + "/mqtt"} {
			d.TLSClientConfig = tlsConf()
			c, resp, err := d.Dial(url, http.Header{})
			if err != nil {
				t.Fatalf("%s through HAProxy: %v", url, err)
			}
			resp.Body.Close()
			appConnect(t, &wsStream{c: c}, "fleet-ws", "fleet", pw, "m2m/+/up/#")
			if i, remote := session("fleet-ws"); i < 0 || !strings.HasPrefix(remote, "127.0.0.4:") {
				t.Fatalf("%s: session on broker %d from %q, want 127.0.0.4", url, i, remote)
			}
			c.Close()
			testwait.For(t, 10*time.Second, "the WebSocket session ended", func() bool { j, _ := session("fleet-ws"); return j < 0 })
		}
	})

	t.Run("health checks accepted, untrusted header refused", func(t *testing.T) {
		for i, b := range brokers {
			testwait.For(t, 15*time.Second, fmt.Sprintf("broker %d: HAProxy's health checks", i+1), func() bool {
				return metricValue(t, b, "m2mguard_proxy_local_connections_total", "") >= 3
			})
			if n := metricValue(t, b, "m2mguard_proxy_headers_refused_total", "invalid"); n != 0 {
				t.Errorf("broker %d refused %v of HAProxy's connections", i+1, n)
			}
		}
		if strings.Contains(hp.Log(), " is DOWN") {
			t.Errorf("HAProxy marked a broker down:\n%s", hp.Log())
		}
		b := brokers[0]
		c := dialFrom(t, "127.0.0.2", b.Addr("tcp"), proxyV2(t, "127.0.0.9:1234", b.Addr("tcp")))
		if !refusedAtOnce(c) {
			t.Fatal("a broker answered a PROXY header sent directly from an untrusted address")
		}
		testwait.For(t, 10*time.Second, "the refusal counted", func() bool {
			return metricValue(t, b, "m2mguard_proxy_headers_refused_total", "untrusted") == 1
		})
	})
}

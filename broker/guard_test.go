package broker_test

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
)

// isTimeout reports whether err is a read deadline passing (gorilla turns
// it into an error of its own that only says Timeout()).
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// metricValue returns the value of the broker's metric name (with a label
// of value label, if label is not ""), or -1 if there is none.
func metricValue(t *testing.T, b *broker.Broker, name, label string) float64 {
	t.Helper()
	mfs, err := b.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label != "" && (len(m.GetLabel()) != 1 || m.GetLabel()[0].GetValue() != label) {
				continue
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	return -1
}

// tlsFiles writes a self-signed certificate for 127.0.0.1 and its key into
// a temporary directory and returns their paths and a pool that trusts it.
func tlsFiles(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "m2mguard test broker"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

// wsStream is a raw WebSocket connection as a byte stream: each Write is
// one binary message, Read reads the messages' bytes in order.
type wsStream struct {
	c *websocket.Conn
	r io.Reader
}

func (s *wsStream) Write(p []byte) (int, error) {
	if err := s.c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (s *wsStream) Read(p []byte) (int, error) {
	for {
		if s.r == nil {
			_, r, err := s.c.NextReader()
			if err != nil {
				return 0, err
			}
			s.r = r
		}
		n, err := s.r.Read(p)
		if errors.Is(err, io.EOF) {
			s.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (s *wsStream) Close() error { return s.c.Close() }

// transport dials the broker's listener id ("tcp", "tls", "ws", "wss") and
// returns the raw byte stream, with nothing sent yet.
type transport struct {
	id   string
	pool *x509.CertPool
}

func (tr transport) dial(b *broker.Broker) (io.ReadWriteCloser, error) {
	tc := &tls.Config{RootCAs: tr.pool, MinVersion: tls.VersionTLS12}
	switch tr.id {
	case "tcp":
		return net.Dial("tcp", b.Addr("tcp"))
	case "tls":
		return tls.Dial("tcp", b.Addr("tls"), tc)
	default:
		scheme, addr := "ws", b.Addr("ws")
		if tr.id == "wss" {
			scheme = "wss"
		}
		d := websocket.Dialer{Subprotocols: []string{"mqtt"}, TLSClientConfig: tc, HandshakeTimeout: 10 * time.Second}
		c, resp, err := d.Dial(scheme+"://"+addr+"/mqtt", nil)
		if err != nil {
			return nil, err
		}
		resp.Body.Close()
		return &wsStream{c: c}, nil
	}
}

func encode(t *testing.T, pk packets.Packet) []byte {
	t.Helper()
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	}
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// readPacket reads one MQTT packet and returns its first byte and body.
func readPacket(r *bufio.Reader) (byte, []byte, error) {
	first, err := r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	var n, shift int
	for {
		b, err := r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n |= int(b&0x7f) << shift
		if b&0x80 == 0 {
			break
		}
		if shift += 7; shift > 21 {
			return 0, nil, errors.New("bad remaining length")
		}
	}
	body := make([]byte, n)
	_, err = io.ReadFull(r, body)
	return first, body, err
}

// appConnect logs in as application app over s (MQTT 3.1.1, keepalive 0:
// no read deadline ever) and subscribes to filter; it returns once the
// SUBACK arrived.
func appConnect(t *testing.T, s io.ReadWriter, clientID, app string, password []byte, filter string) {
	t.Helper()
	s.Write(encode(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 0, ClientIdentifier: clientID,
			UsernameFlag: true, Username: []byte(app), PasswordFlag: true, Password: password}}))
	r := bufio.NewReader(s)
	if first, body, err := readPacket(r); err != nil || first != 0x20 || len(body) != 2 || body[1] != 0 {
		t.Fatalf("%s: connack %x % x %v", clientID, first, body, err)
	}
	s.Write(encode(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: filter, Qos: 0}}}))
	if first, body, err := readPacket(r); err != nil || first != 0x90 || len(body) != 3 || body[2] != 0 {
		t.Fatalf("%s: suback %x % x %v", clientID, first, body, err)
	}
}

// TestWebSocketListenerGuarded (SECURITY.md, attacks tried): WebSocket
// connections that never send a CONNECT were neither limited per address
// nor closed. Now the WebSocket listener is bound at Start (port 0 works,
// the address is known), its connections count against the same
// per-address limit as the TCP listener's, and every one of them must send
// its CONNECT in time.
func TestWebSocketListenerGuarded(t *testing.T) {
	t.Parallel()
	t.Run("limits shared across listeners", func(t *testing.T) {
		t.Parallel()
		const limit = 8
		cfg := testConfig(t)
		cfg.MQTT.WS = "127.0.0.1:0"
		cfg.MQTT.MaxConnsPerAddr = limit
		cfg.MQTT.ConnectTimeout = time.Minute // long: whatever closes below is a refusal
		b, _ := start(t, cfg)
		ws := transport{id: "ws"}
		var admitted, refused int
		for i := 0; i < limit+4; i++ {
			s, err := ws.dial(b)
			if err != nil {
				refused++
				continue
			}
			defer s.Close()
			admitted++
		}
		if admitted != limit || refused != 4 {
			t.Fatalf("%d WebSocket connections from one address without CONNECT: %d admitted, %d refused; want %d admitted",
				limit+4, admitted, refused, limit)
		}
		// The TCP listener shares the limit: the address has used it up.
		c, err := net.Dial("tcp", b.Addr("tcp"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); isTimeout(err) {
			t.Fatal("a TCP connection beyond the per-address limit, counted over all listeners, was kept")
		}
		testwait.For(t, 10*time.Second, "m2mguard_connections_refused_total{limit=per-addr} 5 and m2mguard_connections_open 8", func() bool {
			return metricValue(t, b, "m2mguard_connections_refused_total", "per-addr") == 5 && metricValue(t, b, "m2mguard_connections_open", "") == limit
		})
	})

	certFile, keyFile, pool := tlsFiles(t)
	for _, tr := range []transport{{id: "ws"}, {id: "wss", pool: pool}} {
		t.Run("connect deadline "+tr.id, func(t *testing.T) {
			t.Parallel()
			cfg := testConfig(t)
			cfg.MQTT.WS = "127.0.0.1:0"
			if tr.id == "wss" {
				cfg.MQTT.TLS, cfg.MQTT.TLSCert, cfg.MQTT.TLSKey = "", certFile, keyFile
			}
			cfg.MQTT.ConnectTimeout = 300 * time.Millisecond
			b, _ := start(t, cfg)
			pw := []byte("watch-password-0123")
			addApp(t, b, "watch", pw)
			// One client logs in over the WebSocket in time; three only
			// open the WebSocket.
			loggedIn, err := tr.dial(b)
			if err != nil {
				t.Fatal(err)
			}
			defer loggedIn.Close()
			appConnect(t, loggedIn, "watch-1", "watch", pw, "m2m/+/up/#")
			idle := make([]io.ReadWriteCloser, 3)
			for i := range idle {
				if idle[i], err = tr.dial(b); err != nil {
					t.Fatal(err)
				}
				defer idle[i].Close()
			}
			for i, s := range idle {
				s.(*wsStream).c.SetReadDeadline(time.Now().Add(15 * time.Second))
				if _, err := s.Read(make([]byte, 1)); isTimeout(err) {
					t.Fatalf("idle WebSocket %d without CONNECT still open after 15 s (connect timeout %v)", i, cfg.MQTT.ConnectTimeout)
				}
			}
			// The client that sent its CONNECT outlived them: the CONNECT
			// deadline ended when its CONNECT was read.
			if cl, ok := b.Server().Clients.Get("watch-1"); !ok || cl.Closed() {
				t.Fatal("the logged-in WebSocket client was closed at the CONNECT deadline")
			}
		})
	}
}

// TestWebSocketListenerMeasure is the documented long run of the review's
// attack: 2,000 WebSocket connections from one address, no CONNECT, with the
// default limits (256 per address, 10 s CONNECT deadline).
//
//	M2MGUARD_MEASURE=1 go test ./broker -run TestWebSocketListenerMeasure -v
func TestWebSocketListenerMeasure(t *testing.T) {
	if os.Getenv("M2MGUARD_MEASURE") == "" {
		t.Skip("set M2MGUARD_MEASURE=1 to measure")
	}
	cfg := testConfig(t)
	cfg.MQTT.WS = "127.0.0.1:0"
	b, _ := start(t, cfg)
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 10 * time.Second}
	var admitted []*websocket.Conn
	refused := 0
	started := time.Now()
	for i := 0; i < 2000; i++ {
		c, resp, err := d.Dial("ws://"+b.Addr("ws")+"/mqtt", nil)
		if err != nil {
			refused++
			continue
		}
		resp.Body.Close()
		defer c.Close()
		admitted = append(admitted, c)
	}
	t.Logf("2000 WebSocket connections from one address in %v: %d admitted, %d refused", time.Since(started).Round(time.Millisecond), len(admitted), refused)
	var closed atomic.Int64
	done := make(chan struct{})
	for _, c := range admitted {
		go func() {
			c.SetReadDeadline(time.Now().Add(45 * time.Second))
			if _, _, err := c.ReadMessage(); !isTimeout(err) {
				closed.Add(1)
			}
			done <- struct{}{}
		}()
	}
	for range admitted {
		<-done
	}
	t.Logf("after the CONNECT deadline: %d of %d admitted closed by the broker (%v after the first dial)", closed.Load(), len(admitted), time.Since(started).Round(time.Second))
}

// TestNonReadingSubscriberDropped (SECURITY.md, attacks tried): an
// application with keepalive 0 subscribes and never reads while a terminal
// floods its subscription. mochi's writer to it blocked forever in
// net.Conn.Write holding the client's write lock. Now the write times out
// after mqtt.write_timeout, the connection is closed, and the publisher and
// the other subscribers carry on — over TCP, TLS and WebSocket alike.
//
// M2MGUARD_MEASURE=1 runs it with the default write timeout (10 s) instead
// of 300 ms.
func TestNonReadingSubscriberDropped(t *testing.T) {
	t.Parallel()
	certFile, keyFile, pool := tlsFiles(t)
	for _, tr := range []transport{{id: "tcp"}, {id: "tls", pool: pool}, {id: "ws"}, {id: "wss", pool: pool}} {
		t.Run(tr.id, func(t *testing.T) {
			t.Parallel()
			cfg := testConfig(t)
			cfg.MQTT.WS = "127.0.0.1:0"
			if tr.pool != nil { // tls, and the WebSocket listener as wss
				cfg.MQTT.TLS, cfg.MQTT.TLSCert, cfg.MQTT.TLSKey = "127.0.0.1:0", certFile, keyFile
			}
			if os.Getenv("M2MGUARD_MEASURE") == "" {
				cfg.MQTT.WriteTimeout = 300 * time.Millisecond
			}
			b, _ := start(t, cfg)
			ctx := t.Context()
			pw := []byte("dash-password-0123")
			for _, name := range []string{"dash", "watch"} {
				addApp(t, b, name, pw)
			}
			tm, err := b.Service().Register(ctx, keysvc.RegisterRequest{SN: "A1", IMEI: "354494040518570", IMSI: "460020084678120"})
			if err != nil {
				t.Fatal(err)
			}

			// The victim: subscribes, then never reads again.
			victim, err := tr.dial(b)
			if err != nil {
				t.Fatal(err)
			}
			defer victim.Close()
			appConnect(t, victim, "dash-1", "dash", pw, "m2m/+/up/#")

			// A well-behaved subscriber, reading all the time.
			var received atomic.Int64
			marker := make(chan struct{}, 1)
			watcher := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + b.Addr("tcp")).SetClientID("watch-1").
				SetUsername("watch").SetPassword(string(pw)).SetAutoReconnect(false).SetConnectRetry(false))
			if tok := watcher.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				t.Fatalf("watcher: %v", tok.Error())
			}
			defer watcher.Disconnect(0)
			if tok := watcher.Subscribe("m2m/+/up/#", 0, func(_ paho.Client, m paho.Message) {
				received.Add(1)
				if m.Topic() == "m2m/A1/up/marker" {
					select {
					case marker <- struct{}{}:
					default:
					}
				}
			}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				t.Fatalf("watcher subscribe: %v", tok.Error())
			}

			// The publisher floods m2m/A1/up/flood until the victim is gone.
			pub := login(t, b.Addr("tcp"), tm)
			defer pub.Close()
			flood := encode(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "m2m/A1/up/flood",
				Payload: make([]byte, 64<<10)})
			victimGone := func() bool {
				cl, ok := b.Server().Clients.Get("dash-1")
				return !ok || cl.Closed()
			}
			sent, began := 0, time.Now()
			for deadline := time.Now().Add(cfg.MQTT.WriteTimeout + 30*time.Second); !victimGone(); sent++ {
				if time.Now().After(deadline) {
					t.Fatalf("the subscriber that does not read is still connected %v into the flood (%d messages of 64 KiB sent, write timeout %v)",
						time.Since(began).Round(time.Second), sent, cfg.MQTT.WriteTimeout)
				}
				pub.SetWriteDeadline(time.Now().Add(10 * time.Second))
				if _, err := pub.Write(flood); err != nil {
					t.Fatalf("publisher after %d messages: %v", sent, err)
				}
			}
			t.Logf("%s: the victim was dropped after %d messages of 64 KiB, %v into the flood (write timeout %v)",
				tr.id, sent, time.Since(began).Round(time.Millisecond), cfg.MQTT.WriteTimeout)

			// The others are unaffected: the publisher's next message reaches
			// the watcher.
			// (Repeated: the watcher's queue may still be full of the flood.)
			after := encode(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "m2m/A1/up/marker",
				Payload: []byte("after")})
			giveUp := time.After(30 * time.Second)
			for got := false; !got; {
				if _, err := pub.Write(after); err != nil {
					t.Fatalf("publisher after the flood: %v", err)
				}
				select {
				case <-marker:
					got = true
				case <-time.After(200 * time.Millisecond):
				case <-giveUp:
					t.Fatalf("the watcher did not get the marker (%d messages received)", received.Load())
				}
			}
			if cl, ok := b.Server().Clients.Get(tm.SN); !ok || cl.Closed() {
				t.Fatal("the publisher was disconnected")
			}
			if n := metricValue(t, b, "m2mguard_write_timeouts_total", ""); n != 1 {
				t.Fatalf("m2mguard_write_timeouts_total = %v, want 1", n)
			}
		})
	}
}

// TestMetricsNeedToken (SECURITY.md, attacks tried): /metrics told anyone
// which refusal reason each login got (an sn/IMEI/IMSI oracle). Now it
// needs the metrics token (generated 0600 in the data directory) or the
// admin token; /healthz stays open and says nothing internal.
func TestMetricsNeedToken(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t)
	b, logs := start(t, cfg)
	// A refused login, so that m2mguard_logins_total has a reason label.
	c, err := net.Dial("tcp", b.Addr("tcp"))
	if err != nil {
		t.Fatal(err)
	}
	c.Write(encode(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "Z9",
			UsernameFlag: true, Username: []byte("Z9;354494040518570;460020084678120"), PasswordFlag: true, Password: []byte("x")}}))
	io.ReadAll(c)
	c.Close()

	get := func(path, tok string) (int, string) {
		req, _ := http.NewRequest("GET", "http://"+b.Addr("admin")+path, nil)
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if status, body := get("/metrics", ""); status != 401 || strings.Contains(body, "m2mguard_") {
		t.Fatalf("GET /metrics without a token = %d, want 401 and no m2mguard_ metric: %.300s", status, body)
	}

	read := func(file string) string {
		data, err := os.ReadFile(filepath.Join(cfg.DataDir, file))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(data))
	}
	adminTok, metricsTok := read("admin.token"), read("metrics.token")
	if fi, err := os.Stat(filepath.Join(cfg.DataDir, "metrics.token")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("metrics.token: %v %v, want mode 0600", fi, err)
	}
	for _, tc := range []struct {
		name, path, tok string
		status          int
		want            string
	}{
		{"metrics without a token", "/metrics", "", 401, ""},
		{"metrics with a wrong token", "/metrics", "not-the-metrics-token-0123", 401, ""},
		{"metrics with the metrics token", "/metrics", metricsTok, 200, "m2mguard_logins_total{"},
		{"metrics with the admin token", "/metrics", adminTok, 200, "m2mguard_logins_total{"},
		{"the metrics token is no admin token", "/v1/terminals", metricsTok, 401, ""},
		{"healthz stays open", "/healthz", "", 200, `"ok"`},
	} {
		status, body := get(tc.path, tc.tok)
		if status != tc.status || !strings.Contains(body, tc.want) {
			t.Errorf("%s: GET %s = %d, want %d with %q: %.300s", tc.name, tc.path, status, tc.status, tc.want, body)
		}
		if status == 401 && strings.Contains(body, "m2mguard_") {
			t.Errorf("%s: a refused request reads metrics: %.300s", tc.name, body)
		}
	}
	if strings.Contains(logs.String(), metricsTok) {
		t.Error("the metrics token appears in the log")
	}
	if !strings.Contains(logs.String(), filepath.Join(cfg.DataDir, "metrics.token")) {
		t.Error("the log does not name the metrics token file")
	}
}

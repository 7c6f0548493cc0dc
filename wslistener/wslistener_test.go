package wslistener_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/m2mguard/m2mguard/wslistener"
)

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// pair returns the two ends of one upgraded WebSocket connection: the
// server end as a wslistener.Conn and the raw client end.
func pair(t testing.TB) (*wslistener.Conn, *websocket.Conn) {
	t.Helper()
	got := make(chan *websocket.Conn, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		got <- ws
	}))
	t.Cleanup(srv.Close)
	client, resp, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	t.Cleanup(func() { client.Close() })
	server := wslistener.NewConn(<-got)
	t.Cleanup(func() { server.Close() })
	return server, client
}

// readN reads n bytes from c in reads of at most chunk bytes.
func readN(c io.Reader, n, chunk int) ([]byte, error) {
	var out []byte
	buf := make([]byte, chunk)
	for len(out) < n {
		k, err := c.Read(buf[:min(chunk, n-len(out))])
		out = append(out, buf[:k]...)
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

func TestConnReadsMessagesAsStream(t *testing.T) {
	for _, tc := range []struct {
		name  string
		msgs  []string
		chunk int
	}{
		{"one message, one read", []string{"hello"}, 64},
		{"one message, byte by byte", []string{"hello"}, 1},
		{"several messages, reads across them", []string{"ab", "cde", "f", "ghij"}, 3},
		{"empty messages are skipped", []string{"", "ab", "", "", "c"}, 2},
		{"a large message", []string{strings.Repeat("x", 100_000)}, 4096},
	} {
		t.Run(tc.name, func(t *testing.T) {
			server, client := pair(t)
			for _, m := range tc.msgs {
				if err := client.WriteMessage(websocket.BinaryMessage, []byte(m)); err != nil {
					t.Fatal(err)
				}
			}
			want := strings.Join(tc.msgs, "")
			got, err := readN(server, len(want), tc.chunk)
			if err != nil || string(got) != want {
				t.Fatalf("read %q, %v; want %q", got, err, want)
			}
		})
	}
}

func TestConnRefusesText(t *testing.T) {
	server, client := pair(t)
	client.WriteMessage(websocket.TextMessage, []byte("CONNECT"))
	if _, err := server.Read(make([]byte, 8)); !errors.Is(err, wslistener.ErrNotBinary) {
		t.Fatalf("text message: %v, want ErrNotBinary", err)
	}
}

func TestConnWriteIsOneBinaryMessage(t *testing.T) {
	server, client := pair(t)
	if n, err := server.Write([]byte("\x20\x02\x00\x00")); n != 4 || err != nil {
		t.Fatalf("write: %d %v", n, err)
	}
	op, msg, err := client.ReadMessage()
	if err != nil || op != websocket.BinaryMessage || string(msg) != "\x20\x02\x00\x00" {
		t.Fatalf("client read %d % x %v", op, msg, err)
	}
}

// FuzzConnRead: whatever the messages and the read sizes, the stream read
// is the messages' bytes in order.
func FuzzConnRead(f *testing.F) {
	f.Add([]byte("abcdef"), []byte{2, 0, 3}, uint8(2))
	f.Add([]byte{}, []byte{0, 0}, uint8(1))
	f.Add(bytes.Repeat([]byte{0x30}, 300), []byte{200, 100}, uint8(7))
	server, client := pair(f)
	f.Fuzz(func(t *testing.T, data, cuts []byte, chunk uint8) {
		if chunk == 0 {
			chunk = 1
		}
		rest := data
		for _, c := range cuts { // cut data into messages at the given lengths
			n := min(int(c), len(rest))
			if err := client.WriteMessage(websocket.BinaryMessage, rest[:n]); err != nil {
				t.Fatal(err)
			}
			rest = rest[n:]
		}
		if len(rest) > 0 {
			if err := client.WriteMessage(websocket.BinaryMessage, rest); err != nil {
				t.Fatal(err)
			}
		}
		got, err := readN(server, len(data), int(chunk))
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read % x, %v; want % x", got, err, data)
		}
	})
}

// mqttEcho is an EstablishFn that answers every byte read with the same
// byte until the connection ends, and records the listener id.
type mqttEcho struct {
	mu  sync.Mutex
	ids []string
}

func (e *mqttEcho) establish(id string, c net.Conn) error {
	e.mu.Lock()
	e.ids = append(e.ids, id)
	e.mu.Unlock()
	_, err := io.Copy(c, c)
	return err
}

// serve starts a listener on a loopback port of its own.
func serve(t *testing.T, opts wslistener.Options) (*wslistener.Listener, *mqttEcho) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := wslistener.New("ws1", ln, opts)
	if err := l.Init(slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	e := &mqttEcho{}
	go l.Serve(e.establish)
	t.Cleanup(func() { l.Close(func(string) {}) })
	return l, e
}

func dial(t *testing.T, url string, tc *tls.Config) *websocket.Conn {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}, TLSClientConfig: tc, HandshakeTimeout: 10 * time.Second}
	c, resp, err := d.Dial(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if c.Subprotocol() != "mqtt" {
		t.Errorf("subprotocol %q, want mqtt", c.Subprotocol())
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func selfSigned(t *testing.T) (*tls.Config, *x509.CertPool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "wslistener test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS12}, pool
}

func TestListenerServesMQTTBytes(t *testing.T) {
	srvTLS, pool := selfSigned(t)
	for _, tc := range []struct {
		scheme string
		opts   wslistener.Options
		client *tls.Config
	}{
		{"ws", wslistener.Options{}, nil},
		{"wss", wslistener.Options{TLSConfig: srvTLS}, &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}},
	} {
		t.Run(tc.scheme, func(t *testing.T) {
			l, e := serve(t, tc.opts)
			if l.Protocol() != tc.scheme || l.ID() != "ws1" || strings.HasSuffix(l.Address(), ":0") {
				t.Fatalf("protocol %s id %s address %s", l.Protocol(), l.ID(), l.Address())
			}
			c := dial(t, tc.scheme+"://"+l.Address()+"/any/path", tc.client)
			c.WriteMessage(websocket.BinaryMessage, []byte{0x10, 0x00})
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, msg, err := c.ReadMessage(); err != nil || !bytes.Equal(msg, []byte{0x10, 0x00}) {
				t.Fatalf("echo % x %v", msg, err)
			}
			e.mu.Lock()
			defer e.mu.Unlock()
			if len(e.ids) != 1 || e.ids[0] != "ws1" {
				t.Fatalf("establish got ids %v", e.ids)
			}
		})
	}
	if srvTLS.NextProtos != nil {
		t.Error("New changed the caller's tls.Config")
	}
}

// TestIdleClientsClosed: a connection that never sends its upgrade request,
// and an upgraded one that never sends a byte, are both closed at the
// ConnectTimeout.
func TestIdleClientsClosed(t *testing.T) {
	l, _ := serve(t, wslistener.Options{ConnectTimeout: 200 * time.Millisecond})

	raw, err := net.Dial("tcp", l.Address())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.Write([]byte("GET / HTTP/1.1\r\n")) // and nothing more
	raw.SetReadDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.ReadAll(raw); isTimeout(err) {
		t.Fatal("an HTTP request that never ends keeps its connection")
	}

	c := dial(t, "ws://"+l.Address()+"/mqtt", nil)
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	if _, _, err := c.ReadMessage(); isTimeout(err) {
		t.Fatal("an upgraded connection without a CONNECT keeps its connection")
	}
}

func TestNotAWebSocket(t *testing.T) {
	l, e := serve(t, wslistener.Options{})
	resp, err := http.Get("http://" + l.Address() + "/mqtt")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("plain GET: %d, want 400", resp.StatusCode)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.ids) != 0 {
		t.Fatal("a plain HTTP request reached establish")
	}
}

func TestClose(t *testing.T) {
	t.Run("while serving", func(t *testing.T) {
		l, _ := serve(t, wslistener.Options{})
		addr := l.Address()
		var closed []string
		l.Close(func(id string) { closed = append(closed, id) })
		if fmt.Sprint(closed) != "[ws1]" {
			t.Fatalf("closeClients called with %v", closed)
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			t.Fatal("the port still accepts after Close")
		}
		l.Close(func(id string) { closed = append(closed, id) }) // again: nothing, no callback (mochifix relies on it)
		if fmt.Sprint(closed) != "[ws1]" {
			t.Fatalf("a second Close called back: %v", closed)
		}
	})
	t.Run("before Serve", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		l := wslistener.New("ws1", ln, wslistener.Options{})
		l.Init(nil)
		l.Close(func(string) {})
		done := make(chan struct{})
		go func() { l.Serve(func(string, net.Conn) error { return nil }); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Serve after Close does not return")
		}
	})
}

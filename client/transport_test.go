package client

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/wslistener"
)

// listen binds a loopback port chosen by the kernel.
func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// selfSigned returns a server certificate for 127.0.0.1 and a pool that
// trusts it.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "m2m test broker"},
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
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// TLS and WebSocket broker URLs work, with the same login.
func TestTransports(t *testing.T) {
	t.Parallel()
	cert, pool := selfSigned(t)
	srvTLS := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	// Every listener is bound before the broker serves (mochi's own
	// WebSocket listener binds inside Serve, racing the first dial).
	tlsLn, wsLn, wssLn := listen(t), listen(t), listen(t)
	tlsAddr, wsAddr, wssAddr := tlsLn.Addr().String(), wsLn.Addr().String(), wssLn.Addr().String()
	p := newPlatform(t, codec.HS256,
		listeners.NewNet("tls", tls.NewListener(tlsLn, srvTLS)),
		wslistener.New("ws", wsLn, wslistener.Options{}),
		wslistener.New("wss", wssLn, wslistener.Options{TLSConfig: srvTLS}),
	)
	for _, url := range []string{"ssl://" + tlsAddr, "ws://" + wsAddr + "/mqtt", "wss://" + wssAddr + "/mqtt"} {
		t.Run(url[:3], func(t *testing.T) {
			ev := newEvents()
			c, err := New(Config{Brokers: []string{url}, TLS: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
				Identity: testID, Alg: codec.HS256, Store: NewMemStore(&Record{Current: testCreds()}), OnEvent: ev.on,
				ConnectTimeout: 5 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			if err := c.Connect(ctx); err != nil {
				t.Fatal(err)
			}
			if err := c.Publish(ctx, "via", []byte(url), 1); err != nil {
				t.Fatal(err)
			}
			if m := p.nextUp(); string(m.payload) != url {
				t.Fatalf("got %q", m.payload)
			}
		})
	}
}

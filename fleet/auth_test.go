package fleet

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// TestOptionsRefused: options that would put the fleet's state on the
// network unprotected, or cannot work, are refused with ErrConfig before
// anything connects.
func TestOptionsRefused(t *testing.T) {
	t.Parallel()
	ok := Options{URLs: []string{"nats://127.0.0.1:4222"}, BrokerID: "a"}
	for _, tc := range []struct {
		name string
		mod  func(*Options)
		want string // in the error; "" = accepted
	}{
		{"loopback without credentials", func(*Options) {}, ""},
		{"localhost and ::1", func(o *Options) { o.URLs = []string{"localhost:4222", "nats://[::1]:4222"} }, ""},
		{"no broker id", func(o *Options) { o.BrokerID = "" }, "broker id"},
		{"broker id with a dot", func(o *Options) { o.BrokerID = "a.b" }, "broker id"},
		{"no URL", func(o *Options) { o.URLs = nil }, "no NATS URL"},
		{"remote without TLS", func(o *Options) { o.URLs = []string{"nats://10.0.0.5:4222"}; o.Token = []byte("t") }, "TLS required"},
		{"remote without credentials", func(o *Options) { o.URLs = []string{"tls://nats.example:4222"} }, "credentials required"},
		{"remote with TLS and token", func(o *Options) { o.URLs = []string{"tls://nats.example:4222"}; o.Token = []byte("t") }, ""},
		{"remote with CA and user", func(o *Options) {
			o.URLs = []string{"nats://nats.example:4222"}
			o.TLS.CAFile = "ca.pem"
			o.User, o.Password = "u", []byte("p")
		}, ""},
		{"two kinds of credentials", func(o *Options) { o.Token = []byte("t"); o.User = "u" }, "more than one"},
		{"credentials in the URL", func(o *Options) { o.URLs = []string{"nats://u:secret@127.0.0.1:4222"} }, "carries credentials"},
		{"other scheme", func(o *Options) { o.URLs = []string{"ws://127.0.0.1:4222"} }, "scheme"},
		{"too many replicas", func(o *Options) { o.Replicas = 7 }, "replicas"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := ok
			tc.mod(&o)
			_, err := o.withDefaults()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("err = %v, want ErrConfig with %q", err, tc.want)
			}
			if err != nil && strings.Contains(err.Error(), "secret") {
				t.Fatalf("the error shows the password: %v", err)
			}
		})
	}
	if _, err := (NodeOptions{Name: "n", StoreDir: t.TempDir(), Host: "0.0.0.0"}).serverOptions(); !errors.Is(err, ErrConfig) {
		t.Fatalf("a node listening off loopback without authentication: %v", err)
	}
	if _, err := (NodeOptions{Name: "n", StoreDir: t.TempDir(), Host: "0.0.0.0", Token: []byte("x"), ClusterName: "c",
		RouteUser: "r", RoutePassword: []byte("p")}).serverOptions(); !errors.Is(err, ErrConfig) {
		t.Fatalf("routes off loopback without mutual TLS: %v", err)
	}
}

// TestNodeRefusesUnauthenticated: an embedded node with users refuses a
// client without credentials or with a wrong password, and Open without
// them fails when its context ends.
func TestNodeRefusesUnauthenticated(t *testing.T) {
	t.Parallel()
	c := newCluster(t, 1, nil)
	if nc, err := nats.Connect(c.url(0), nats.Timeout(time.Second)); err == nil {
		nc.Close()
		t.Fatal("a client without credentials connected")
	}
	if nc, err := nats.Connect(c.url(0), nats.UserInfo(testUser, "wrong"), nats.Timeout(time.Second)); err == nil {
		nc.Close()
		t.Fatal("a client with a wrong password connected")
	}
	o := c.testOptions("a", 0)
	o.User, o.Password = "", nil
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if f, err := Open(ctx, o); err == nil {
		_ = f.Close()
		t.Fatal("Open without credentials succeeded")
	}
}

// TestTLSCluster: a 3-node cluster whose routes and client listener use
// mutual TLS with a test CA serves the fleet; a client without TLS, or
// without a client certificate, is refused.
func TestTLSCluster(t *testing.T) {
	t.Parallel()
	pki := newTestPKI(t)
	c := newCluster(t, 3, func(_ int, o *NodeOptions) {
		o.TLS = &TLSOptions{CAFile: pki.ca, CertFile: pki.cert, KeyFile: pki.key}
		o.RouteTLS = &TLSOptions{CAFile: pki.ca, CertFile: pki.cert, KeyFile: pki.key}
	})
	f := c.open("a", 0, func(o *Options) { o.TLS = TLSOptions{CAFile: pki.ca, CertFile: pki.cert, KeyFile: pki.key} })
	g := c.open("b", 2, func(o *Options) { o.TLS = TLSOptions{CAFile: pki.ca, CertFile: pki.cert, KeyFile: pki.key} })
	if f.Replicas() != 3 {
		t.Fatalf("replicas = %d over TLS routes", f.Replicas())
	}
	ctx := context.Background()
	until := time.Now().Add(time.Minute)
	if ok, err := f.Claim(ctx, testSN, 1, until); !ok || err != nil {
		t.Fatalf("claim over TLS: %v %v", ok, err)
	}
	if ok, err := g.Claim(ctx, testSN, 1, until); ok || err != nil {
		t.Fatalf("replay over TLS on another node: %v %v", ok, err)
	}
	if nc, err := nats.Connect(c.url(1), nats.UserInfo(testUser, testPassword), nats.Timeout(time.Second)); err == nil {
		nc.Close()
		t.Fatal("a client without TLS connected")
	}
	if nc, err := nats.Connect(c.url(1), nats.UserInfo(testUser, testPassword), nats.RootCAs(pki.ca), nats.Timeout(time.Second)); err == nil {
		nc.Close()
		t.Fatal("a client without a client certificate connected")
	}
}

type testPKI struct{ ca, cert, key string }

// newTestPKI writes a CA and one certificate for 127.0.0.1 and localhost,
// good for servers and clients (routes use it both ways).
func newTestPKI(t *testing.T) testPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "m2mguard test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "m2mguard test node"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	p := testPKI{ca: filepath.Join(dir, "ca.pem"), cert: filepath.Join(dir, "node.pem"), key: filepath.Join(dir, "node-key.pem")}
	write := func(file, typ string, der []byte) {
		if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(p.ca, "CERTIFICATE", caDER)
	write(p.cert, "CERTIFICATE", der)
	write(p.key, "EC PRIVATE KEY", keyDER)
	return p
}

// TestAuthMethods: a broker connects with each kind of credentials an
// embedded node accepts: user and password, an NKey seed file, a token.
func TestAuthMethods(t *testing.T) {
	t.Parallel()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := kp.Seed()
	pub, _ := kp.PublicKey()
	seedFile := filepath.Join(t.TempDir(), "broker.nk")
	if err := os.WriteFile(seedFile, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	users := newCluster(t, 1, func(_ int, o *NodeOptions) { o.NKeys = []string{pub} })
	token := newCluster(t, 1, func(_ int, o *NodeOptions) { o.Users = nil; o.Token = []byte("fleet-token-5e1b") })
	for _, tc := range []struct {
		name string
		c    *cluster
		mod  func(*Options)
	}{
		{"user and password", users, func(*Options) {}},
		{"nkey seed file", users, func(o *Options) { o.User, o.Password, o.NKeySeedFile = "", nil, seedFile }},
		{"token", token, func(o *Options) { o.User, o.Password, o.Token = "", nil, []byte("fleet-token-5e1b") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.c.open("a", 0, tc.mod)
			if ok, err := f.Claim(context.Background(), tc.name, 1, time.Now().Add(time.Minute)); err != nil || !ok {
				t.Fatalf("claim: %v %v", ok, err)
			}
		})
	}
	if nc, err := nats.Connect(token.url(0), nats.Token("wrong"), nats.Timeout(time.Second)); err == nil {
		nc.Close()
		t.Fatal("a wrong token connected")
	}
}

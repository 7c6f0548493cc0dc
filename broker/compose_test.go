package broker_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/m2mguard/m2mguard/fleet"
)

// composeFile is what the tests read of a compose file.
type composeFile struct {
	Services map[string]composeService `yaml:"services"`
	Networks map[string]struct {
		IPAM struct {
			Config []struct {
				Subnet string `yaml:"subnet"`
			} `yaml:"config"`
		} `yaml:"ipam"`
	} `yaml:"networks"`
	Volumes map[string]any `yaml:"volumes"`
}

type composeService struct {
	Image       string            `yaml:"image"`
	Build       string            `yaml:"build"`
	Environment map[string]string `yaml:"environment"`
	Volumes     []string          `yaml:"volumes"`
	Ports       []string          `yaml:"ports"`
	Networks    yaml.Node         `yaml:"networks"` // a list of names or a map
	DependsOn   map[string]struct {
		Condition string `yaml:"condition"`
	} `yaml:"depends_on"`
	Command []string `yaml:"command"`
}

// networks returns the service's networks and their fixed IPv4 addresses
// ("" = none).
func (s composeService) networks(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	switch s.Networks.Kind {
	case 0:
	case yaml.SequenceNode:
		var names []string
		if err := s.Networks.Decode(&names); err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			out[n] = ""
		}
	default:
		var m map[string]struct {
			IPv4 string `yaml:"ipv4_address"`
		}
		if err := s.Networks.Decode(&m); err != nil {
			t.Fatal(err)
		}
		for n, v := range m {
			out[n] = v.IPv4
		}
	}
	return out
}

// mount is one entry of a service's volumes.
type mount struct{ source, target, mode string }

func (s composeService) mounts(t *testing.T) []mount {
	t.Helper()
	var out []mount
	for _, v := range s.Volumes {
		parts := strings.Split(v, ":")
		if len(parts) < 2 {
			t.Fatalf("volume %q: want source:target", v)
		}
		m := mount{source: parts[0], target: parts[1]}
		if len(parts) > 2 {
			m.mode = parts[2]
		}
		out = append(out, m)
	}
	return out
}

// under returns the mount holding file and file's path inside its source.
func (s composeService) under(t *testing.T, file string) (mount, string, bool) {
	t.Helper()
	for _, m := range s.mounts(t) {
		if rel, err := filepath.Rel(m.target, file); err == nil && !strings.HasPrefix(rel, "..") {
			return m, rel, true
		}
	}
	return mount{}, "", false
}

func readCompose(t *testing.T, file string) composeFile {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var c composeFile
	if err := yaml.Unmarshal(data, &c); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return c
}

var fleetBrokers = []string{"broker1", "broker2", "broker3"}

// imageEnv is the Dockerfile's ENV M2MGUARD_ settings, which the brokers'
// environment starts from.
func imageEnv(t *testing.T) map[string]string {
	t.Helper()
	data, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, m := range regexp.MustCompile(`(M2MGUARD_[A-Z0-9_]+)=(\S+)`).FindAllStringSubmatch(string(data), -1) {
		env[m[1]] = m[2]
	}
	if env["M2MGUARD_DATA_DIR"] == "" {
		t.Fatal("Dockerfile sets no M2MGUARD_DATA_DIR")
	}
	return env
}

// TestComposeFleet checks docker-compose.fleet.yml without Docker: the
// services are there; each broker's environment resolves, with the
// broker's own resolver, into a valid fleet configuration (embedded NATS
// routed to all three nodes over mutual TLS with route credentials, PROXY
// headers trusted from HAProxy's address alone, Vault with AppRole); every
// file a broker or HAProxy reads is on a volume that the certs or
// vault-init container writes before it starts; only HAProxy is published;
// HAProxy's shipped configuration names the brokers and their listeners;
// the files the compose file mounts from the repository exist.
func TestComposeFleet(t *testing.T) {
	c := readCompose(t, "../docker-compose.fleet.yml")
	for _, name := range append([]string{"vault", "vault-init", "certs", "haproxy", "provision", "terminal"}, fleetBrokers...) {
		if _, ok := c.Services[name]; !ok {
			t.Errorf("service %s missing", name)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	for name, s := range c.Services {
		for _, m := range s.mounts(t) {
			if strings.HasPrefix(m.source, ".") {
				if _, err := os.Stat(filepath.Join("..", m.source)); err != nil {
					t.Errorf("%s mounts %s: %v", name, m.source, err)
				}
			} else if _, ok := c.Volumes[m.source]; !ok {
				t.Errorf("%s mounts volume %s, which is not declared", name, m.source)
			}
		}
		if s.Build != "" {
			if _, err := os.Stat(filepath.Join("..", s.Build, "Dockerfile")); err != nil {
				t.Errorf("%s builds %s: %v", name, s.Build, err)
			}
		}
	}

	// The fleet network and the fixed addresses on it.
	subnets := c.Networks["fleet"].IPAM.Config
	if len(subnets) != 1 {
		t.Fatalf("network fleet: want one subnet, got %+v", subnets)
	}
	subnet, err := netip.ParsePrefix(subnets[0].Subnet)
	if err != nil {
		t.Fatal(err)
	}
	addrOn := func(service string) netip.Addr {
		t.Helper()
		a, err := netip.ParseAddr(c.Services[service].networks(t)["fleet"])
		if err != nil || !subnet.Contains(a) {
			t.Fatalf("%s: want a fixed address in %s on network fleet: %v", service, subnet, err)
		}
		return a
	}
	haproxyAddr := addrOn("haproxy")

	// The files the producers (one-shot containers) write, by volume.
	producers := map[string][]string{} // volume -> producing services
	for _, p := range []string{"certs", "vault-init"} {
		for _, m := range c.Services[p].mounts(t) {
			producers[m.source] = append(producers[m.source], p)
		}
	}
	// producedBy checks that file, read by service, is on a volume a
	// producer writes (naming the file in its script) and that the
	// service waits for that producer.
	producedBy := func(service, file string) {
		t.Helper()
		if file == "" {
			return // reported above
		}
		s := c.Services[service]
		m, rel, ok := s.under(t, file)
		if !ok {
			t.Errorf("%s reads %s, which is on none of its volumes", service, file)
			return
		}
		if m.mode != "ro" {
			t.Errorf("%s: mount %s of its secrets should be read-only", service, m.target)
		}
		for _, p := range producers[m.source] {
			if !strings.Contains(strings.Join(c.Services[p].Command, "\n"), path.Base(rel)) {
				continue
			}
			if dep := s.DependsOn[p]; dep.Condition != "service_completed_successfully" {
				t.Errorf("%s reads %s from %s but does not wait for it to complete (depends_on: %+v)", service, file, p, dep)
			}
			return
		}
		t.Errorf("%s reads %s (volume %s), which no certs or vault-init script writes", service, file, m.source)
	}

	base := imageEnv(t)
	var ids []string
	for _, name := range fleetBrokers {
		s := c.Services[name]
		env := mergeEnv(base, s.Environment)
		cfg, err := resolve(t, "", env)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		cl := cfg.Cluster
		ids = append(ids, cl.BrokerID)
		if !cl.Enabled() || !cl.EmbeddedNATS || cl.BrokerID != name || cfg.Store.Type != "vault" {
			t.Errorf("%s: not a fleet broker on Vault with embedded NATS: store %s, cluster %+v", name, cfg.Store.Type, cl)
		}
		var want []string
		for _, b := range fleetBrokers {
			want = append(want, "nats-route://"+b+":6222")
		}
		if got := slices.Sorted(slices.Values(cl.Embedded.Routes)); !slices.Equal(got, want) {
			t.Errorf("%s: routes %v, want %v", name, got, want)
		}
		host, port, err := net.SplitHostPort(cl.Embedded.ClusterListen)
		if err != nil || port != "6222" || host == "127.0.0.1" || host == "localhost" {
			t.Errorf("%s: route listener %q, want one the other brokers reach on 6222", name, cl.Embedded.ClusterListen)
		}
		e := cl.Embedded
		if e.RouteUser == "" || e.RoutePassword != "" || e.RoutePasswordFile == "" || e.TLSCert == "" || e.TLSKey == "" || e.TLSCA == "" {
			t.Errorf("%s: routes off loopback need a route user, a password file (not a password) and mutual TLS: %+v", name, e)
		}
		if cl.NATSUser == "" || cl.NATSPassword != "" || cl.NATSPasswordFile == "" {
			t.Errorf("%s: the embedded node needs a user with a password file", name)
		}
		if v := cfg.Store.Vault; v.AppRoleRoleIDFile == "" || v.AppRoleSecretIDFile == "" || v.Token != "" {
			t.Errorf("%s: want AppRole from files, no token", name)
		}
		if want := []netip.Prefix{netip.PrefixFrom(haproxyAddr, 32)}; !slices.Equal(cfg.MQTT.ProxyProtocolTrusted, want) {
			t.Errorf("%s: mqtt.proxy_protocol_trusted = %v, want HAProxy's address alone, %v", name, cfg.MQTT.ProxyProtocolTrusted, want)
		}
		if cfg.MQTT.TLSCert != "" {
			t.Errorf("%s: TLS ends at HAProxy; the broker should have no mqtt.tls_cert", name)
		}
		for _, f := range []string{e.RoutePasswordFile, e.TLSCert, e.TLSKey, e.TLSCA, cl.NATSPasswordFile, cfg.Store.Vault.AppRoleRoleIDFile, cfg.Store.Vault.AppRoleSecretIDFile} {
			producedBy(name, f)
		}
		for _, m := range s.mounts(t) {
			if strings.Contains(m.source, "secrets") && m.source != name+"-secrets" {
				t.Errorf("%s mounts %s: each broker sees only its own secrets", name, m.source)
			}
		}
		if len(s.Ports) > 0 {
			t.Errorf("%s publishes %v: clients must reach the brokers only through HAProxy", name, s.Ports)
		}
		if _, ok := s.networks(t)["edge"]; ok {
			t.Errorf("%s is on the edge network, where clients are", name)
		}
		addrOn(name)
	}
	if len(slices.Compact(slices.Sorted(slices.Values(ids)))) != len(fleetBrokers) {
		t.Errorf("broker ids %v are not unique", ids)
	}

	// HAProxy: the shipped configuration, its certificate from certs, its
	// servers the brokers' listeners.
	h := c.Services["haproxy"]
	if !slices.Contains(h.Volumes, "./deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro") {
		t.Errorf("haproxy does not run the shipped deploy/haproxy/haproxy.cfg: %v", h.Volumes)
	}
	cfgText, err := os.ReadFile("../deploy/haproxy/haproxy.cfg")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`crt (\S+)`).FindAllStringSubmatch(string(cfgText), -1) {
		producedBy("haproxy", m[1])
	}
	for _, m := range regexp.MustCompile(`(?m)^\s*server \S+ (\S+):(\d+)`).FindAllStringSubmatch(string(cfgText), -1) {
		if !slices.Contains(fleetBrokers, m[1]) || m[2] != "1883" && m[2] != "8083" {
			t.Errorf("haproxy.cfg: server %s:%s is not a broker's MQTT or WebSocket listener", m[1], m[2])
		}
	}
	for _, p := range []string{"1883:1883", "8883:8883", "8083:8083", "8084:8084"} {
		if !slices.Contains(h.Ports, p) {
			t.Errorf("haproxy does not publish %s", p)
		}
	}

	// The demo: provisioned through a broker's admin API, the terminal on
	// the edge network reaching HAProxy.
	if cmd := strings.Join(c.Services["provision"].Command, "\n"); !strings.Contains(cmd, "http://broker1:8080") || !strings.Contains(cmd, "/broker-data/admin.token") {
		t.Errorf("provision does not use broker1's admin API and token: %s", cmd)
	}
	if m, _, ok := c.Services["provision"].under(t, "/broker-data/admin.token"); !ok || m.source != "broker1-data" {
		t.Errorf("provision: /broker-data is not broker1's data volume")
	}
	term := c.Services["terminal"]
	if _, ok := term.networks(t)["fleet"]; ok {
		t.Error("terminal is on the fleet network: it must reach the brokers through HAProxy only")
	}
	if !strings.Contains(strings.Join(term.Command, "\n"), "--broker tcp://haproxy:1883") {
		t.Error("terminal does not publish through HAProxy")
	}
}

// TestComposeFleetCertificates runs the certs container's script (with
// openssl from the host, paths moved into a temporary directory) and checks
// what it makes: route certificates that chain to the route CA, name their
// broker's host name and fixed address and serve both ends of a mutual TLS
// route; a route password shared by all; HAProxy's mqtt.pem a chain and
// key that the route CA does not sign; and nothing new on a second run.
func TestComposeFleetCertificates(t *testing.T) {
	c := readCompose(t, "../docker-compose.fleet.yml")
	dir := t.TempDir()
	run := func() { t.Helper(); runCertsScript(t, c, dir, nil) }
	run()
	read := func(p string) []byte {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	routePool := x509.NewCertPool()
	if !routePool.AppendCertsFromPEM(read("secrets/broker1/nats/ca.pem")) {
		t.Fatal("route ca.pem: no certificate")
	}
	first := map[string][]byte{}
	for _, b := range fleetBrokers {
		d := "secrets/" + b + "/nats/"
		kp, err := tls.X509KeyPair(read(d+"route.pem"), read(d+"route.key"))
		if err != nil {
			t.Fatalf("%s: %v", b, err)
		}
		leaf := kp.Leaf
		ip := c.Services[b].networks(t)["fleet"]
		for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: routePool, DNSName: b, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
				t.Errorf("%s route certificate, usage %v: %v", b, usage, err)
			}
		}
		if err := leaf.VerifyHostname(ip); err != nil {
			t.Errorf("%s route certificate: %v", b, err)
		}
		if !slices.Equal(read(d+"route-password"), read("secrets/broker1/nats/route-password")) {
			t.Errorf("%s: route password differs from broker1's", b)
		}
		if len(strings.TrimSpace(string(read(d+"route-password")))) < 32 {
			t.Errorf("%s: route password too short", b)
		}
		first[b] = read(d + "route.pem")
	}
	mqttPEM := read("secrets/haproxy/mqtt.pem")
	kp, err := tls.X509KeyPair(mqttPEM, mqttPEM)
	if err != nil {
		t.Fatalf("haproxy mqtt.pem: %v", err)
	}
	if _, err := kp.Leaf.Verify(x509.VerifyOptions{Roots: routePool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
		t.Error("HAProxy's certificate is signed by the route CA: its key could join the routes")
	}
	mqttPool := x509.NewCertPool()
	mqttPool.AppendCertsFromPEM(read("secrets/haproxy/mqtt-ca.pem"))
	if _, err := kp.Leaf.Verify(x509.VerifyOptions{Roots: mqttPool, DNSName: "localhost"}); err != nil {
		t.Errorf("HAProxy's certificate: %v", err)
	}
	if blk, _ := pem.Decode(read("secrets/haproxy/mqtt-ca.pem")); blk == nil || strings.Contains(blk.Type, "KEY") {
		t.Error("mqtt-ca.pem should hold the CA certificate only")
	}
	run() // a restart keeps what exists
	for _, b := range fleetBrokers {
		if !slices.Equal(first[b], read("secrets/"+b+"/nats/route.pem")) {
			t.Errorf("%s: a second run issued a new route certificate", b)
		}
	}
}

// runCertsScript runs the certs container's script with the host's
// openssl, its mounts moved under dir (and edit, if not nil, applied to
// the script); it skips the test without openssl.
func runCertsScript(t *testing.T, c composeFile, dir string, edit func(string) string) {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	certs := c.Services["certs"]
	script := strings.ReplaceAll(strings.Join(certs.Command, "\n"), "$$", "$")
	script = regexp.MustCompile(`(?m)^\s*apk add .*$`).ReplaceAllString(script, ":")
	if os.Geteuid() != 0 {
		script = regexp.MustCompile(`(?m)^(\s*)chown `).ReplaceAllString(script, "$1: chown ")
	}
	// The script names its mounts directly (/pki) or through variables
	// (/secrets/$b): move their top directories.
	tops := map[string]bool{}
	for _, m := range certs.mounts(t) {
		if err := os.MkdirAll(filepath.Join(dir, m.target), 0o755); err != nil {
			t.Fatal(err)
		}
		tops[strings.SplitN(m.target, "/", 3)[1]] = true
	}
	for top := range tops {
		script = regexp.MustCompile(`(^|[\s"=])/`+top+`\b`).ReplaceAllString(script, "${1}"+dir+"/"+top)
	}
	if edit != nil {
		script = edit(script)
	}
	if out, err := exec.Command("sh", "-ec", script).CombinedOutput(); err != nil {
		t.Fatalf("certs script: %v\n%s", err, out)
	}
}

// TestComposeFleetRoutesFormCluster starts three NATS nodes as the
// brokers' embedded nodes do, with the route certificates, CA and route
// password the certs script makes (its broker addresses replaced by
// 127.0.0.1, where the test's nodes listen), and requires JetStream to
// become ready on all three: the routes authenticate both ways over
// mutual TLS with what the compose file deploys.
func TestComposeFleetRoutesFormCluster(t *testing.T) {
	c := readCompose(t, "../docker-compose.fleet.yml")
	dir := t.TempDir()
	runCertsScript(t, c, dir, func(s string) string {
		return regexp.MustCompile(`IP:[0-9.]+\$n`).ReplaceAllString(s, "IP:127.0.0.1")
	})
	var ls []net.Listener
	var routes []string
	for range fleetBrokers {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		routes = append(routes, "nats-route://"+l.Addr().String())
	}
	for _, l := range ls {
		l.Close()
	}
	var nodes []*fleet.Node
	for i, b := range fleetBrokers {
		d := filepath.Join(dir, "secrets", b, "nats")
		pw, err := os.ReadFile(filepath.Join(d, "route-password"))
		if err != nil {
			t.Fatal(err)
		}
		n, err := fleet.StartNode(fleet.NodeOptions{
			Name: b, StoreDir: filepath.Join(dir, "nats", b), ClusterName: "m2mguard",
			ClusterHost: "127.0.0.1", ClusterPort: ls[i].Addr().(*net.TCPAddr).Port, Routes: routes,
			Users:     []fleet.NodeUser{{Name: "m2mguard", Password: []byte("pw")}},
			RouteUser: "route", RoutePassword: []byte(strings.TrimSpace(string(pw))),
			RouteTLS: &fleet.TLSOptions{CertFile: filepath.Join(d, "route.pem"), KeyFile: filepath.Join(d, "route.key"), CAFile: filepath.Join(d, "ca.pem")},
			Logger:   slog.New(slog.DiscardHandler),
		})
		if err != nil {
			t.Fatalf("%s: %v", b, err)
		}
		t.Cleanup(n.Shutdown)
		nodes = append(nodes, n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, n := range nodes {
		if err := n.WaitJetStream(ctx); err != nil {
			t.Fatalf("%s: JetStream not ready over the routes: %v", n.Name(), err)
		}
	}
}

// mergeEnv merges environments, later ones winning.
func mergeEnv(ms ...map[string]string) map[string]string {
	out := map[string]string{}
	for _, m := range ms {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

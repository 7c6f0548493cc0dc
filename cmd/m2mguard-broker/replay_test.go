package main

import (
	"crypto/rand"
	"encoding/binary"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/freeport"
	"github.com/m2mguard/m2mguard/internal/syncbuf"
	"github.com/m2mguard/m2mguard/internal/testbin"
	"github.com/m2mguard/m2mguard/internal/testwait"
)

// brokerBinary is the broker, with m2mctl beside it, built once for the
// tests of this process that run them.
var brokerBinary struct {
	once sync.Once
	path string // the broker
	ctl  string // m2mctl
	err  error
}

// buildBinary returns the broker binary, built at the first call together
// with m2mctl (one go build into testbin's directory, shared with the other
// test packages that run the broker, and relinked only when the code
// changed).
func buildBinary(t *testing.T) string {
	t.Helper()
	b := &brokerBinary
	b.once.Do(func() {
		var bins []string
		if bins, b.err = testbin.Commands("github.com/m2mguard/m2mguard/cmd/m2mguard-broker", "github.com/m2mguard/m2mguard/cmd/m2mctl"); b.err == nil {
			b.path, b.ctl = bins[0], bins[1]
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// TestMain runs 4 parallel tests per CPU at a time, not go test's default
// of one (most of the tests wait for broker processes).
func TestMain(m *testing.M) {
	testwait.SetParallel(4)
	os.Exit(m.Run())
}

// process is a broker binary running in a work directory.
type process struct {
	cmd    *exec.Cmd
	logs   *syncbuf.Buffer
	exited chan error
	mqtt   string // TCP listener
	admin  string // base URL of the admin API
}

// startBinary runs bin in work on free ports, with args added, and waits
// for /healthz.
func startBinary(t *testing.T, bin, work string, args ...string) *process {
	t.Helper()
	p := &process{logs: &syncbuf.Buffer{}, exited: make(chan error, 1), mqtt: freeport.Addr(t)}
	adminAddr := freeport.Addr(t)
	p.admin = "http://" + adminAddr
	p.cmd = exec.Command(bin, append([]string{"--mqtt-tcp", p.mqtt, "--mqtt-ws", "", "--log-level", "debug"}, args...)...)
	p.cmd.Dir = work
	p.cmd.Env = append(os.Environ(), "M2MGUARD_ADMIN_LISTEN="+adminAddr)
	p.cmd.Stderr = p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Kill()
			<-p.exited
		}
	})
	var exitErr error
	exited := false
	healthy := testwait.Until(60*time.Second, func() bool {
		select {
		case exitErr = <-p.exited:
			exited = true
			return true
		default:
		}
		resp, err := http.Get(p.admin + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	switch {
	case exited:
		t.Fatalf("broker exited: %v\n%s", exitErr, p.logs.String())
	case !healthy:
		t.Fatalf("broker not healthy after 60 s\n%s", p.logs.String())
	}
	return p
}

// kill ends the broker with SIGKILL: nothing is flushed or closed.
func (p *process) kill(t *testing.T) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("no exit after SIGKILL")
	}
}

// register adds a terminal over the admin API and returns its bundle.
func (p *process) register(t *testing.T, work, sn string) adminapi.Bundle {
	t.Helper()
	b, err := adminClient(t, p.admin, work).Register(t.Context(), adminapi.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		t.Fatalf("register: %v", err)
	}
	return *b
}

// adminClient returns a client of the admin API at base with the admin
// token the broker running in work generated.
func adminClient(t *testing.T, base, work string) *adminapi.Client {
	t.Helper()
	tok, err := os.ReadFile(filepath.Join(work, "data", "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := adminapi.New(base, strings.TrimSpace(string(tok)), nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// loginToken signs a fresh login token (flag 00) for the bundle's terminal.
func loginToken(t *testing.T, b adminapi.Bundle) []byte {
	t.Helper()
	var n [8]byte
	rand.Read(n[:])
	l := codec.Login{Identity: codec.Identity{SN: b.SN, IMEI: b.IMEI, IMSI: b.IMSI}, Alg: codec.HS256,
		TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(n[:]))}
	pw, err := l.Sign([]byte(b.Up))
	if err != nil {
		t.Fatal(err)
	}
	return pw
}

// connect logs in with MQTT 3.1.1 and returns the CONNACK return code.
func connect(t *testing.T, addr, sn, username string, password []byte) byte {
	t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(sn).SetUsername(username).
		SetPassword(string(password)).SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetProtocolVersion(4).SetConnectTimeout(10 * time.Second)
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(15 * time.Second) {
		t.Fatal("no CONNACK in 15 s")
	}
	code := tok.(*paho.ConnectToken).ReturnCode()
	if code == 0 {
		c.Disconnect(50)
	}
	return code
}

// TestLoginReplayAfterKill: a login token captured from an accepted
// CONNECT is refused after the broker was killed with SIGKILL right after
// that CONNACK and restarted on the same data directory (SECURITY.md,
// attacks tried): the claim of its nonce reached the kernel before the CONNACK.
func TestLoginReplayAfterKill(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	t.Parallel()
	bin := buildBinary(t)
	work := t.TempDir()
	p := startBinary(t, bin, work)
	b := p.register(t, work, "S1")
	username := b.IMEI + ":" + b.IMSI
	captured := loginToken(t, b)
	if code := connect(t, p.mqtt, b.SN, username, captured); code != 0 {
		t.Fatalf("first login: %d\n%s", code, p.logs.String())
	}
	p.kill(t)
	if fi, err := os.Stat(filepath.Join(work, "data", "replay")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("data/replay: %v %v, want a directory 0700", fi, err)
	}

	p = startBinary(t, bin, work)
	if code := connect(t, p.mqtt, b.SN, username, captured); code != v3NotAuthorized {
		t.Fatalf("token replayed after kill -9 and restart: CONNACK %d, want %d", code, v3NotAuthorized)
	}
	// The child's log reaches p.logs through a pipe: poll for the line.
	if !testwait.Until(10*time.Second, func() bool { return strings.Contains(p.logs.String(), "reason=replay") }) {
		t.Fatalf("no refusal with reason replay in the log\n%s", p.logs.String())
	}
	if code := connect(t, p.mqtt, b.SN, username, loginToken(t, b)); code != 0 {
		t.Fatalf("fresh login after the restart: %d", code)
	}
}

const v3NotAuthorized = 5

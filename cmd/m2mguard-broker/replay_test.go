package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/syncbuf"
)

// buildBinary builds the broker into a temporary directory.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "m2mguard-broker")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
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
	p := &process{logs: &syncbuf.Buffer{}, exited: make(chan error, 1), mqtt: freePort(t)}
	adminAddr := freePort(t)
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
	for deadline := time.Now().Add(60 * time.Second); ; {
		resp, err := http.Get(p.admin + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return p
			}
		}
		select {
		case err := <-p.exited:
			t.Fatalf("broker exited: %v\n%s", err, p.logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("broker not healthy after 60 s\n%s", p.logs.String())
		}
	}
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
	b, err := adminClient(t, p.admin, work).Register(context.Background(), adminapi.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120"})
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
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(p.logs.String(), "reason=replay"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no refusal with reason replay in the log\n%s", p.logs.String())
		}
	}
	if code := connect(t, p.mqtt, b.SN, username, loginToken(t, b)); code != 0 {
		t.Fatalf("fresh login after the restart: %d", code)
	}
}

const v3NotAuthorized = 5

// Package haproxytest runs HAProxy for tests: it finds the haproxy binary
// (installing Debian's package when allowed), checks configurations with
// `haproxy -c` and runs HAProxy in the foreground until the test ends.
//
// Without a binary a test skips with a message saying how to install one,
// unless installing is allowed: under CI=true, or with
// M2MGUARD_INSTALL_HAPROXY=1, Binary runs `apt-get install -y haproxy`
// (as root) and fails the test if that does not give a binary. CI must
// never pass by skipping the HAProxy tests.
package haproxytest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/syncbuf"
)

// EnvInstall, set to 1, allows Binary to install Debian's haproxy package
// when no haproxy is on the PATH (CI=true allows it too).
const EnvInstall = "M2MGUARD_INSTALL_HAPROXY"

var install struct {
	once sync.Once
	path string
	err  error
}

// Binary returns the path of haproxy. If there is none, it installs
// Debian's package when allowed (once per test binary), else it skips t.
func Binary(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("haproxy"); err == nil {
		return p
	}
	ci := os.Getenv("CI") == "true"
	if !ci && os.Getenv(EnvInstall) != "1" {
		t.Skipf("haproxy is not installed: apt-get install -y haproxy (Debian/Ubuntu), or run the tests with %s=1 to let them install it", EnvInstall)
	}
	install.once.Do(func() { install.path, install.err = aptInstall() })
	if install.err != nil {
		t.Fatalf("haproxytest: installing haproxy: %v", install.err)
	}
	return install.path
}

func aptInstall() (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	for _, args := range [][]string{{"update", "-qq"}, {"install", "-y", "-qq", "haproxy"}} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("apt-get %s: %w: %s", strings.Join(args, " "), err, tail(out))
		}
	}
	return exec.LookPath("haproxy")
}

func tail(b []byte) string {
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

// Check runs `haproxy -c -f file` and returns its combined output, and an
// error if HAProxy finds the configuration invalid.
func Check(t testing.TB, file string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, Binary(t), "-c", "-f", file).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("haproxy -c -f %s: %w", file, err)
	}
	return string(out), nil
}

// Derive returns cfg with every old string of the pairs replaced by its
// new one, and fails t if an old string does not occur: a derived
// configuration cannot drift silently from the one it is derived from.
func Derive(t testing.TB, cfg string, pairs ...string) string {
	t.Helper()
	if len(pairs)%2 != 0 {
		t.Fatal("haproxytest.Derive: odd number of strings")
	}
	for i := 0; i < len(pairs); i += 2 {
		if !strings.Contains(cfg, pairs[i]) {
			t.Fatalf("haproxytest.Derive: %q is not in the configuration", pairs[i])
		}
		cfg = strings.ReplaceAll(cfg, pairs[i], pairs[i+1])
	}
	return cfg
}

// Process is a running HAProxy.
type Process struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  *syncbuf.Buffer
}

// Start writes cfg into a temporary file, checks it, runs HAProxy on it in
// the foreground and stops it (by its pid) when t ends. HAProxy's own log
// lines (log stdout) are in Log.
func Start(t testing.TB, cfg string) *Process {
	t.Helper()
	bin := Binary(t)
	file := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := Check(t, file); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	p := &Process{done: make(chan struct{}), log: &syncbuf.Buffer{}}
	p.cmd = exec.Command(bin, "-db", "-f", file) // -db: foreground, no daemon
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("haproxytest: start: %v", err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(p.Stop)
	return p
}

// Log returns what HAProxy printed so far.
func (p *Process) Log() string { return p.log.String() }

// Exited reports whether HAProxy has stopped.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Stop stops HAProxy (its own pid only) and waits for it.
func (p *Process) Stop() {
	if p.Exited() {
		return
	}
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// Valid reports whether out, the output of a successful Check, holds no
// warning other than those matching one of allowed.
func Valid(out string, allowed ...string) error {
	var bad []string
	for _, line := range strings.Split(out, "\n") {
		if !strings.Contains(line, "[WARNING]") && !strings.Contains(line, "[ALERT]") {
			continue
		}
		ok := false
		for _, a := range allowed {
			ok = ok || strings.Contains(line, a)
		}
		if !ok {
			bad = append(bad, strings.TrimSpace(line))
		}
	}
	if len(bad) > 0 {
		return errors.New(strings.Join(bad, "\n"))
	}
	if !strings.Contains(out, "Configuration file is valid") {
		return errors.New("haproxy did not say the configuration is valid")
	}
	return nil
}

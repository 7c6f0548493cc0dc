// Package vaulttest runs a real HashiCorp Vault (`vault server -dev`) for
// tests: on a free loopback port, with a random root token, stopped by its
// pid when the test ends.
//
// The binary is found at $M2MGUARD_VAULT_BIN, else at .bin/vault in the
// repository (built by `make vault` from the tools/vault module), else on
// $PATH. Without it a test skips, except under CI=true, where it fails:
// CI must never pass by skipping the Vault tests.
package vaulttest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// Server is a running Vault dev server. Its KV v2 engine is mounted at
// "secret/", as in every dev server.
type Server struct {
	Addr  string // http://127.0.0.1:<port>
	Token string // root token; never log it

	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	stop    sync.Once
}

// Binary returns the path of the vault binary, or an error saying how to
// get one.
func Binary() (string, error) {
	if p := os.Getenv("M2MGUARD_VAULT_BIN"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("vaulttest: M2MGUARD_VAULT_BIN: %w", err)
		}
		return p, nil
	}
	if root, err := repoRoot(); err == nil {
		p := filepath.Join(root, ".bin", "vault")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("vault"); err == nil {
		return p, nil
	}
	return "", errors.New("vaulttest: no vault binary: run `make vault` (or `make test`, which builds it)")
}

// repoRoot walks up from the working directory to the main module's go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.HasPrefix(string(data), "module github.com/m2mguard/m2mguard\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("vaulttest: repository root not found")
		}
		dir = parent
	}
}

// Start runs a Vault dev server for the test and stops it at cleanup.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%v (CI=true: Vault tests may not skip)", err)
		}
		t.Skipf("%v", err)
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ { // a free port can be taken before vault binds it
		s, err := start(bin, t.TempDir())
		if err == nil {
			t.Cleanup(s.Stop)
			return s
		}
		lastErr = err
	}
	t.Fatalf("vaulttest: %v", lastErr)
	return nil
}

func start(bin, dir string) (*Server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	token := make([]byte, 16)
	if _, err := rand.Read(token); err != nil {
		return nil, err
	}
	s := &Server{
		Addr:    fmt.Sprintf("http://127.0.0.1:%d", port),
		Token:   "m2mguard-test-" + hex.EncodeToString(token),
		logPath: filepath.Join(dir, "vault.log"),
		done:    make(chan struct{}),
	}
	logFile, err := os.Create(s.logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	s.cmd = exec.Command(bin, "server", "-dev",
		"-dev-listen-address=127.0.0.1:"+fmt.Sprint(port),
		"-dev-root-token-id="+s.Token,
		"-dev-no-store-token",
	)
	s.cmd.Env = append(os.Environ(), "HOME="+dir, "VAULT_ADDR=", "VAULT_TOKEN=")
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() { s.cmd.Wait(); close(s.done) }()
	if err := s.waitHealthy(30 * time.Second); err != nil {
		s.Stop()
		return nil, fmt.Errorf("%w (server log: %s)", err, s.logPath)
	}
	return s, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (s *Server) waitHealthy(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	hc := &http.Client{Timeout: time.Second}
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return errors.New("vault server exited during start")
		default:
		}
		resp, err := hc.Get(s.Addr + "/v1/sys/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("vault not healthy within %s", timeout)
}

// Client returns an API client for the server with the root token.
func (s *Server) Client(t testing.TB) *vault.Client {
	t.Helper()
	return s.ClientWithToken(t, s.Token)
}

// ClientWithToken returns an API client for the server with token.
func (s *Server) ClientWithToken(t testing.TB, token string) *vault.Client {
	t.Helper()
	cfg := vault.DefaultConfig()
	cfg.Address = s.Addr
	cfg.MaxRetries = 0
	cfg.Timeout = 5 * time.Second
	c, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatalf("vaulttest: client: %v", err)
	}
	c.SetToken(token)
	return c
}

// TokenWithPolicy writes the HCL policy under name and returns a fresh
// token that has only that policy.
func (s *Server) TokenWithPolicy(t testing.TB, name, hcl string) string {
	t.Helper()
	c := s.Client(t)
	ctx := context.Background()
	if err := c.Sys().PutPolicyWithContext(ctx, name, hcl); err != nil {
		t.Fatalf("vaulttest: put policy %s: %v", name, err)
	}
	secret, err := c.Auth().Token().CreateWithContext(ctx, &vault.TokenCreateRequest{
		Policies: []string{name}, NoDefaultPolicy: true, TTL: "1h",
	})
	if err != nil {
		t.Fatalf("vaulttest: create token: %v", err)
	}
	return secret.Auth.ClientToken
}

// Stop stops the server by its pid (the whole process group) and waits for
// it to exit. The dev server keeps its data in memory: a stopped server's
// data is gone. Stop is idempotent.
func (s *Server) Stop() {
	s.stop.Do(func() {
		if s.cmd.Process == nil {
			return
		}
		syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
			<-s.done
		}
	})
}

// Pid returns the server's process id.
func (s *Server) Pid() int { return s.cmd.Process.Pid }

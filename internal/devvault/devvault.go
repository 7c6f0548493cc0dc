// Package devvault runs a real HashiCorp Vault dev server (`vault server
// -dev`) as a child process: on a free loopback port, with a random root
// token, its log in a file, stopped by its pid. The tests (through
// internal/vaulttest) and the benchmark suite (cmd/m2m-bench) use it; it does
// not depend on package testing.
//
// The binary is found at $M2MGUARD_VAULT_BIN, else at .bin/vault in the
// repository (built by `make vault` from the tools/vault module), else on
// $PATH.
package devvault

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/m2mguard/m2mguard/internal/freeport"
)

// EnvBinary is the variable that names the vault binary.
const EnvBinary = "M2MGUARD_VAULT_BIN"

// ErrNoBinary: no vault binary was found.
var ErrNoBinary = errors.New("devvault: no vault binary: run `make vault` (or `make test`, which builds it), or set $" + EnvBinary)

// Server is a running Vault dev server. Its KV v2 engine is mounted at
// "secret/", as in every dev server; its data lives in memory only.
type Server struct {
	Addr    string // http://127.0.0.1:<port>
	Token   string // root token; never log it
	LogPath string // the server's stdout and stderr

	cmd  *exec.Cmd
	done chan struct{}
	stop sync.Once
}

// Options configure Start. The zero value is usable except for Dir.
type Options struct {
	// Dir holds the server's log and its HOME (required).
	Dir string
	// TokenPrefix starts the root token (default "m2mguard-dev-").
	TokenPrefix string
	// Timeout bounds the wait for the server to report healthy (default 60 s).
	Timeout time.Duration
}

// Binary returns the path of the vault binary, or ErrNoBinary.
func Binary() (string, error) {
	if p := os.Getenv(EnvBinary); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("devvault: $%s: %w", EnvBinary, err)
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
	return "", ErrNoBinary
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
			return "", errors.New("devvault: repository root not found")
		}
		dir = parent
	}
}

// Start runs a dev server of the binary bin and returns once it is healthy.
// A free port can be taken by another process before Vault binds it:
// Start tries three ports before it gives up. The caller owns the server
// and must Stop it.
func Start(ctx context.Context, bin string, opts Options) (*Server, error) {
	if opts.Dir == "" {
		return nil, errors.New("devvault: Options.Dir is required")
	}
	if opts.TokenPrefix == "" {
		opts.TokenPrefix = "m2mguard-dev-"
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 60 * time.Second
	}
	var errs []error
	for range 3 {
		s, err := start(ctx, bin, opts)
		if err == nil {
			return s, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

func start(ctx context.Context, bin string, opts Options) (*Server, error) {
	ports, err := freeport.Pick(1) // below the ephemeral range: no client's outgoing connection takes it first
	if err != nil {
		return nil, err
	}
	port := ports[0]
	token := make([]byte, 16)
	if _, err := rand.Read(token); err != nil {
		return nil, err
	}
	s := &Server{
		Addr:    fmt.Sprintf("http://127.0.0.1:%d", port),
		Token:   opts.TokenPrefix + hex.EncodeToString(token),
		LogPath: filepath.Join(opts.Dir, "vault.log"),
		done:    make(chan struct{}),
	}
	logFile, err := os.Create(s.LogPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	s.cmd = exec.Command(bin, "server", "-dev",
		fmt.Sprintf("-dev-listen-address=127.0.0.1:%d", port),
		"-dev-root-token-id="+s.Token,
		"-dev-no-store-token",
	)
	s.cmd.Env = append(os.Environ(), "HOME="+opts.Dir, "VAULT_ADDR=", "VAULT_TOKEN=")
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("devvault: start %s: %w", bin, err)
	}
	go func() { s.cmd.Wait(); close(s.done) }()
	if err := s.waitHealthy(ctx, opts.Timeout); err != nil {
		s.Stop()
		return nil, fmt.Errorf("devvault: %w (server log: %s)", err, s.LogPath)
	}
	return s, nil
}

// waitHealthy polls /v1/sys/health until it answers 200.
func (s *Server) waitHealthy(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	hc := &http.Client{Timeout: time.Second}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.Addr+"/v1/sys/health", nil)
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-s.done:
			return errors.New("vault server exited during start")
		case <-ctx.Done():
			return fmt.Errorf("vault not healthy within %s", timeout)
		case <-tick.C:
		}
	}
}

// Stop kills the server by its pid (the whole process group, SIGKILL) and
// waits for it to exit. A dev server keeps its data in memory: a graceful
// stop (SIGTERM: Vault seals and shuts its core down, about half a second)
// would keep nothing more, and every test that runs one waited for it at
// its end. Stop is idempotent.
func (s *Server) Stop() {
	s.stop.Do(func() {
		if s.cmd.Process == nil {
			return
		}
		syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.done
	})
}

// Pid returns the server's process id.
func (s *Server) Pid() int { return s.cmd.Process.Pid }

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// brokerPkg is the broker's package, built when --broker is not given.
const brokerPkg = "github.com/m2mguard/m2mguard/cmd/m2mguard-broker"

// buildBroker builds the broker binary into dir with the go command; it
// must run inside the m2mguard module.
func buildBroker(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "m2mguard-broker")
	out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, brokerPkg).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build %s (run inside the m2mguard repository, or pass --broker): %w\n%s", brokerPkg, err, out)
	}
	return bin, nil
}

// brokerProc is one m2mguard-broker process on loopback with a fresh data
// directory, its log in a file. startBroker starts it; stop or kill ends it.
type brokerProc struct {
	cmd     *exec.Cmd
	Pid     int
	DataDir string
	LogPath string
	Args    []string // the command line after the binary
	TCP     string   // MQTT over TCP, host:port
	WS      string   // MQTT over WebSocket, host:port
	Admin   string   // admin API, host:port
	token   string   // admin bearer token, from <data_dir>/admin.token

	logFile *os.File
	exited  chan struct{} // closed when the process has been waited for
	waitErr error         // the process's exit, once exited is closed
}

// errPortTaken: the broker could not bind a port picked as free (another
// process took it in between); starting again with new ports helps.
var errPortTaken = errors.New("a port picked for the broker was taken")

// startBroker starts bin with a fresh data directory under dir, on free
// loopback ports, with extra flags after the ones it sets (--data-dir,
// --mqtt-tcp, --mqtt-ws, --admin-listen: flags every version of the broker
// has), and returns once /healthz answers 200. Variables M2MGUARD_* of this
// process's environment are not passed on: the broker's configuration is
// its command line.
func startBroker(ctx context.Context, bin, dir string, extra []string) (*brokerProc, error) {
	var err error
	for range 3 {
		var b *brokerProc
		b, err = startBrokerOnce(ctx, bin, dir, extra)
		if !errors.Is(err, errPortTaken) {
			return b, err
		}
		os.RemoveAll(dir)
	}
	return nil, err
}

func startBrokerOnce(ctx context.Context, bin, dir string, extra []string) (*brokerProc, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	b := &brokerProc{DataDir: filepath.Join(dir, "data"), LogPath: filepath.Join(dir, "broker.log"),
		TCP: ports[0], WS: ports[1], Admin: ports[2], exited: make(chan struct{})}
	b.Args = append([]string{"--data-dir", b.DataDir, "--mqtt-tcp", b.TCP, "--mqtt-ws", b.WS, "--admin-listen", b.Admin}, extra...)
	b.logFile, err = os.OpenFile(b.LogPath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	b.cmd = exec.Command(bin, b.Args...)
	b.cmd.Dir = dir
	b.cmd.Stdout, b.cmd.Stderr = b.logFile, b.logFile
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "M2MGUARD_") {
			b.cmd.Env = append(b.cmd.Env, kv)
		}
	}
	if err := b.cmd.Start(); err != nil {
		b.logFile.Close()
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	b.Pid = b.cmd.Process.Pid
	go func() {
		b.waitErr = b.cmd.Wait()
		b.logFile.Close()
		close(b.exited)
	}()
	if err := b.waitHealthy(ctx, 30*time.Second); err != nil {
		b.kill()
		return nil, err
	}
	tok, err := os.ReadFile(filepath.Join(b.DataDir, "admin.token"))
	if err != nil {
		b.kill()
		return nil, fmt.Errorf("admin token: %w", err)
	}
	b.token = strings.TrimSpace(string(tok))
	return b, nil
}

// freePorts returns n loopback addresses whose ports were free a moment ago.
func freePorts(n int) ([]string, error) {
	var out []string
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		out = append(out, l.Addr().String())
	}
	return out, nil
}

// waitHealthy polls /healthz until it answers 200, the process exits or
// the timeout passes.
func (b *brokerProc) waitHealthy(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	hc := &http.Client{Timeout: time.Second}
	for {
		resp, err := hc.Get("http://" + b.Admin + "/healthz")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-b.exited:
			tail := b.logTail(2048)
			if bytes.Contains(tail, []byte("address already in use")) {
				return errPortTaken
			}
			return fmt.Errorf("broker exited while starting (%v); its log ends:\n%s", b.waitErr, tail)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("broker not healthy after %s; its log ends:\n%s", timeout, b.logTail(2048))
		}
	}
}

// logTail returns the last n bytes of the broker's log.
func (b *brokerProc) logTail(n int64) []byte {
	f, err := os.Open(b.LogPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		f.Seek(fi.Size()-n, io.SeekStart)
	}
	data, _ := io.ReadAll(io.LimitReader(f, n))
	return data
}

// logSize returns the size of the broker's log file.
func (b *brokerProc) logSize() int64 {
	fi, err := os.Stat(b.LogPath)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// alive reports whether the process is still running.
func (b *brokerProc) alive() bool {
	select {
	case <-b.exited:
		return false
	default:
		return true
	}
}

// kill ends the process with SIGKILL and waits for it.
func (b *brokerProc) kill() {
	if b.alive() {
		b.cmd.Process.Signal(syscall.SIGKILL)
	}
	<-b.exited
}

// stop asks the broker to shut down (SIGTERM), waits up to grace, then
// kills it; it says which happened.
func (b *brokerProc) stop(grace time.Duration) string {
	if !b.alive() {
		return fmt.Sprintf("had exited (%v)", b.waitErr)
	}
	start := time.Now()
	b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.exited:
		if b.waitErr != nil {
			return fmt.Sprintf("exited in %.1f s after SIGTERM: %v", time.Since(start).Seconds(), b.waitErr)
		}
		return fmt.Sprintf("clean, %.1f s after SIGTERM", time.Since(start).Seconds())
	case <-time.After(grace):
		b.kill()
		return fmt.Sprintf("still running %s after SIGTERM: killed", grace)
	}
}

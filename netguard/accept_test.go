package netguard_test

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/netguard"
)

// emfile is the error accept(2) gives a process out of file descriptors,
// as package net wraps it.
func emfile() error {
	return &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
}

// failingListener fails its first n Accepts (n < 0: all of them) with
// err, then accepts from the real listener.
type failingListener struct {
	net.Listener
	err error

	mu sync.Mutex
	n  int
}

func (l *failingListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	fail := l.n != 0
	if l.n > 0 {
		l.n--
	}
	l.mu.Unlock()
	if fail {
		return nil, l.err
	}
	return l.Listener.Accept()
}

// errorCounter counts the errors of the listener it wraps.
type errorCounter struct {
	net.Listener
	errs atomic.Int64
}

func (l *errorCounter) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		l.errs.Add(1)
	}
	return c, err
}

func tcpListener(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func TestTemporary(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"EMFILE", emfile(), true},
		{"ENFILE", &net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", syscall.ENFILE)}, true},
		{"ENOBUFS", &net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", syscall.ENOBUFS)}, true},
		{"ENOMEM", &net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", syscall.ENOMEM)}, true},
		{"ECONNABORTED", &net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", syscall.ECONNABORTED)}, true},
		{"timeout", &net.OpError{Op: "accept", Err: os.ErrDeadlineExceeded}, true},
		{"closed", &net.OpError{Op: "accept", Err: net.ErrClosed}, false},
		{"EINVAL", &net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", syscall.EINVAL)}, false},
		{"other", errors.New("tls: something"), false},
		{"nil", nil, false},
	} {
		if got := netguard.Temporary(tc.err); got != tc.want {
			t.Errorf("%s: Temporary(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

// TestAcceptRetriesTemporaryErrors: Accept outlives EMFILE, pausing 5 ms
// doubled after each error in a row, and counts and reports every error.
func TestAcceptRetriesTemporaryErrors(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var delays []time.Duration
	g := netguard.New(netguard.Options{OnAcceptError: func(err error, d time.Duration) {
		if !errors.Is(err, syscall.EMFILE) {
			t.Errorf("OnAcceptError(%v)", err)
		}
		mu.Lock()
		delays = append(delays, d)
		mu.Unlock()
	}})
	inner := tcpListener(t)
	l := g.Wrap(&failingListener{Listener: inner, err: emfile(), n: 4})
	t.Cleanup(func() { l.Close() })
	client := dial(t, l.Addr().String())
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("Accept after four EMFILE: %v", err)
	}
	defer c.Close()
	client.Write([]byte("x"))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("read the accepted connection: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []time.Duration{5 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond, 40 * time.Millisecond}
	if fmt.Sprint(delays) != fmt.Sprint(want) {
		t.Errorf("pauses %v, want %v", delays, want)
	}
	if s := g.Stats(); s.AcceptErrors != 4 {
		t.Errorf("AcceptErrors %d, want 4", s.AcceptErrors)
	}
}

// TestAcceptEnds: Accept returns a permanent error as it is, and a Close
// ends an Accept pausing after a temporary error (rather than at the end
// of its pause, or never).
func TestAcceptEnds(t *testing.T) {
	t.Parallel()
	t.Run("permanent", func(t *testing.T) {
		t.Parallel()
		boom := errors.New("boom")
		l := netguard.New(netguard.Options{}).Wrap(&failingListener{Listener: tcpListener(t), err: boom, n: -1})
		defer l.Close()
		if _, err := l.Accept(); !errors.Is(err, boom) {
			t.Fatalf("Accept: %v, want %v", err, boom)
		}
	})
	t.Run("closed while pausing", func(t *testing.T) {
		t.Parallel()
		g := netguard.New(netguard.Options{})
		l := g.Wrap(&failingListener{Listener: tcpListener(t), err: emfile(), n: -1})
		done := make(chan error, 1)
		go func() { _, err := l.Accept(); done <- err }()
		// Past the first pauses, so that the one in progress is long.
		testwait.For(t, 10*time.Second, "accept errors", func() bool { return g.Stats().AcceptErrors >= 6 })
		l.Close()
		select {
		case err := <-done:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("Accept still pausing after Close")
		}
	})
}

// mqttConnect sends a CONNECT (MQTT 3.1.1, client id id) on c and
// reports whether a successful CONNACK comes back within wait.
func mqttConnect(c net.Conn, id string, wait time.Duration) error {
	pkt := []byte{0x10, byte(12 + len(id)), 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, 0, byte(len(id))}
	if _, err := c.Write(append(pkt, id...)); err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(wait))
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		return err
	}
	if ack[0] != 0x20 || ack[3] != 0 {
		return fmt.Errorf("CONNACK % x", ack)
	}
	return nil
}

// TestBrokerOutlivesFileLimit: a mochi server on a guarded listener,
// with the process out of file descriptors for real (RLIMIT_NOFILE
// lowered and filled), keeps answering CONNECTs once descriptors are
// free again. mochi's own listener loop ends on the first accept error.
// Not parallel: it lowers the process's limit.
func TestBrokerOutlivesFileLimit(t *testing.T) {
	g := netguard.New(netguard.Options{})
	counter := &errorCounter{Listener: tcpListener(t)}
	l := g.Wrap(counter)
	srv := mqtt.New(&mqtt.Options{InlineClient: false, Logger: slog.New(slog.DiscardHandler)})
	srv.AddHook(new(auth.AllowHook), nil) // test only: no authentication under test
	if err := srv.AddListener(listeners.NewNet("guarded", l)); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	addr := l.Addr().String()
	if err := mqttConnect(dial(t, addr), "before", 10*time.Second); err != nil {
		t.Fatalf("CONNECT before the limit: %v", err)
	}

	// Lower the soft limit a little above the highest descriptor open,
	// and fill it up.
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	highest := 0
	for _, fd := range fds {
		var n int
		fmt.Sscan(fd.Name(), &n)
		highest = max(highest, n)
	}
	lim := old
	lim.Cur = uint64(highest + 32)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skipf("setrlimit: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
			t.Errorf("restore RLIMIT_NOFILE: %v", err)
		}
	})
	var fillers []*os.File
	release := func() {
		for _, f := range fillers {
			f.Close()
		}
		fillers = nil
	}
	t.Cleanup(release)
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			if !errors.Is(err, syscall.EMFILE) {
				t.Fatalf("fill descriptors: %v", err)
			}
			break
		}
		fillers = append(fillers, f)
	}
	// One descriptor for the client: the kernel completes its connection,
	// and the server's accept finds no descriptor for it.
	fillers[len(fillers)-1].Close()
	fillers = fillers[:len(fillers)-1]
	client, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial with one descriptor free: %v", err)
	}
	t.Cleanup(func() { client.Close() })
	testwait.For(t, 10*time.Second, "accept to fail with EMFILE", func() bool { return counter.errs.Load() >= 1 })

	release()
	if err := mqttConnect(client, "during", 20*time.Second); err != nil {
		t.Fatalf("CONNECT of the client that came while out of descriptors: %v", err)
	}
	if err := mqttConnect(dial(t, addr), "after", 10*time.Second); err != nil {
		t.Fatalf("CONNECT after: %v", err)
	}
	if s := g.Stats(); s.AcceptErrors < 1 {
		t.Errorf("AcceptErrors %d after EMFILE", s.AcceptErrors)
	}
}

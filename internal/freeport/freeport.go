// Package freeport picks loopback ports for tests and test servers that
// must name a port before the process that listens on it starts (a broker
// binary, a dev Vault, a NATS node restarted on its port). The ports lie below the kernel's ephemeral
// range, so that no outgoing connection of this or another test process
// takes one in the meantime, and none is handed out twice by a process.
package freeport

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sync"
)

var (
	mu    sync.Mutex
	taken = map[int]bool{}
)

// T is what Ports and Addr need of a test (testing.TB has it).
type T interface {
	Helper()
	Fatalf(format string, args ...any)
}

// Ports returns n ports free on loopback a moment ago; the test fails if
// there are none.
func Ports(t T, n int) []int {
	t.Helper()
	ports, err := Pick(n)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return ports
}

// Addr returns "127.0.0.1:port" of one such port.
func Addr(t T) string {
	t.Helper()
	return fmt.Sprintf("127.0.0.1:%d", Ports(t, 1)[0])
}

// Pick returns n ports free on loopback a moment ago.
func Pick(n int) ([]int, error) {
	lo, hi := 20000, 32000
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		var eLo, eHi int
		if _, err := fmt.Sscan(string(b), &eLo, &eHi); err == nil && eLo > 2048 {
			hi = min(hi, eLo)
			lo = min(lo, hi/2)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	var ports []int
	for tries := 0; len(ports) < n; tries++ {
		if tries > 100*n {
			return nil, fmt.Errorf("freeport: no free port in [%d, %d) after %d tries", lo, hi, tries)
		}
		p := lo + rand.IntN(hi-lo)
		if taken[p] {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		_ = l.Close()
		taken[p] = true
		ports = append(ports, p)
	}
	return ports, nil
}

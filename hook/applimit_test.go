package hook

import (
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestAppLimiterBudgets: each budget refuses, with its name, the login that
// would exceed it, in the order the hook documents; a refusal takes nothing
// from the other budgets.
func TestAppLimiterBudgets(t *testing.T) {
	t0 := time.Unix(1_800_000_000, 0)
	type step struct {
		host string
		dt   time.Duration // after t0
		want appLimit
		// done: hand the slot back at once (failed: as a failure); else
		// it stays running.
		done, failed bool
	}
	tests := []struct {
		name  string
		opts  AppLimitOptions
		steps []step
	}{
		{"one at a time per address", AppLimitOptions{Concurrency: 4}, []step{
			{host: "192.0.2.1"},
			{host: "192.0.2.1", want: limitConcurrencyPerAddr},
			{host: "192.0.2.2", done: true},
		}},
		{"global concurrency", AppLimitOptions{Concurrency: 2}, []step{
			{host: "192.0.2.1"},
			{host: "192.0.2.2"},
			{host: "192.0.2.3", want: limitConcurrency},
		}},
		{"per-address rate, refilled with time", AppLimitOptions{Concurrency: 4, RatePerAddr: 1, BurstPerAddr: 2}, []step{
			{host: "192.0.2.1", done: true},
			{host: "192.0.2.1", done: true},
			{host: "192.0.2.1", want: limitRatePerAddr},
			{host: "192.0.2.2", done: true},
			{host: "192.0.2.1", dt: time.Second, done: true},
		}},
		{"global rate; the refusal costs the address nothing", AppLimitOptions{Concurrency: 4, Rate: 1, Burst: 1, RatePerAddr: 0.001, BurstPerAddr: 1}, []step{
			{host: "192.0.2.1", done: true},
			{host: "192.0.2.2", want: limitRate},
			{host: "192.0.2.2", dt: time.Second, done: true}, // its one token: the refusal took none
			{host: "192.0.2.3", dt: time.Second, want: limitRate},
		}},
		{"failures per address, whatever the names", AppLimitOptions{Concurrency: 4, RatePerAddr: 100, FailuresPerAddr: 2, FailureRefill: time.Minute}, []step{
			{host: "192.0.2.1", done: true, failed: true},
			{host: "192.0.2.1", done: true}, // a success costs nothing
			{host: "192.0.2.1", done: true, failed: true},
			{host: "192.0.2.1", want: limitFailuresPerAddr},
			{host: "192.0.2.2", done: true},
			{host: "192.0.2.1", dt: time.Minute, done: true, failed: true},
			{host: "192.0.2.1", dt: time.Minute, want: limitFailuresPerAddr},
		}},
		{"an IPv6 /64 is one address", AppLimitOptions{Concurrency: 4}, []step{
			{host: "2001:db8:1:2::1"},
			{host: "2001:db8:1:2:ffff::7", want: limitConcurrencyPerAddr},
			{host: "2001:db8:1:3::1"},
		}},
		{"an IPv4-mapped IPv6 address is the IPv4 address", AppLimitOptions{Concurrency: 4}, []step{
			{host: "192.0.2.1"},
			{host: "::ffff:192.0.2.1", want: limitConcurrencyPerAddr},
		}},
		{"every remembered address running", AppLimitOptions{Concurrency: 4, MaxAddrs: 2}, []step{
			{host: "192.0.2.1"},
			{host: "192.0.2.2"},
			{host: "192.0.2.3", want: limitAddrs},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := newAppLimiter(tc.opts)
			for i, s := range tc.steps {
				now := t0.Add(s.dt)
				a, got := l.admit(s.host, now)
				if got != s.want || (a == nil) != (s.want != limitNone) {
					t.Fatalf("step %d (%s): %q, want %q", i+1, s.host, got, s.want)
				}
				if a != nil && s.done {
					l.done(a, s.failed, now)
				}
			}
		})
	}
}

// TestAppLimiterTableBounded: the address table never holds more than
// MaxAddrs addresses, forgets the least recently seen first, and never
// forgets one with a verification running (its budget would start afresh).
func TestAppLimiterTableBounded(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	l := newAppLimiter(AppLimitOptions{Concurrency: 2, Rate: 1e6, MaxAddrs: 3, FailuresPerAddr: 1, FailureRefill: time.Hour})
	held, _ := l.admit("10.0.0.1", now) // running throughout
	if held == nil {
		t.Fatal("first login refused")
	}
	for i := 2; i < 1000; i++ {
		a, limit := l.admit(fmt.Sprintf("10.0.%d.%d", i/256, i%256), now)
		if a == nil {
			t.Fatalf("address %d: %q", i, limit)
		}
		l.done(a, true, now)
		if n := len(l.addrs); n > 3 || n != l.lru.Len() {
			t.Fatalf("%d addresses in the map, %d in the list, bound 3", n, l.lru.Len())
		}
	}
	if _, limit := l.admit("10.0.0.1", now); limit != limitConcurrencyPerAddr {
		t.Fatalf("the running address was forgotten: %q", limit)
	}
	// 10.0.3.231 failed last and is remembered; 10.0.0.2 was forgotten
	// and starts afresh.
	if _, limit := l.admit("10.0.3.231", now); limit != limitFailuresPerAddr {
		t.Fatalf("recent address: %q", limit)
	}
	if a, limit := l.admit("10.0.0.2", now); a == nil {
		t.Fatalf("forgotten address: %q", limit)
	}
}

func TestAppLimitDefaults(t *testing.T) {
	o := AppLimitOptions{}.withDefaults()
	want := AppLimitOptions{
		Concurrency: max(1, runtime.GOMAXPROCS(0)/2), ConcurrencyPerAddr: 1,
		RatePerAddr: 2, BurstPerAddr: 4, FailuresPerAddr: 20, FailureRefill: 10 * time.Second, MaxAddrs: 10000,
	}
	want.Rate = 10 * float64(want.Concurrency)
	want.Burst = int(2 * want.Rate)
	if o != want {
		t.Fatalf("defaults %+v, want %+v", o, want)
	}
}

func TestAddrKey(t *testing.T) {
	for host, want := range map[string]string{
		"192.0.2.1":            "192.0.2.1",
		"::ffff:192.0.2.1":     "192.0.2.1",
		"2001:db8:1:2:3:4:5:6": "2001:db8:1:2::/64",
		"fe80::1%eth0":         "fe80::/64",
		"pipe":                 "pipe",
	} {
		if got := addrKey(host); got != want {
			t.Errorf("addrKey(%q) = %q, want %q", host, got, want)
		}
	}
}

// FuzzAddrKey: any host string gives a key without panicking; an IP address
// gives itself (IPv4, also when mapped into IPv6) or its /64 (IPv6), which
// every address of that /64 shares.
func FuzzAddrKey(f *testing.F) {
	for _, s := range []string{"192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1", "fe80::1%eth0", "pipe", "", "::", "1.2.3.4:5"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, host string) {
		key := addrKey(host)
		a, err := netip.ParseAddr(host)
		if err != nil {
			if key != host {
				t.Fatalf("addrKey(%q) = %q, want the host itself", host, key)
			}
			return
		}
		a = a.Unmap()
		if a.Is4() {
			if key != a.String() {
				t.Fatalf("addrKey(%q) = %q", host, key)
			}
			return
		}
		p, err := netip.ParsePrefix(key)
		if err != nil || p.Bits() != 64 || !p.Contains(a.WithZone("")) || !strings.HasSuffix(key, "/64") {
			t.Fatalf("addrKey(%q) = %q, want its /64", host, key)
		}
		b := a.As16()
		b[15] ^= 0xff
		if other := addrKey(netip.AddrFrom16(b).String()); other != key {
			t.Fatalf("%q and its neighbour have keys %q and %q", host, key, other)
		}
	})
}

package hook

import (
	"container/list"
	"context"
	"errors"
	"math"
	"net/netip"
	"runtime"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/m2mguard/m2mguard/keysvc"
)

// reasonBusy is the refusal reason of an application login over one of the
// AppLimitOptions budgets (m2mguard_logins_total{reason="busy"}).
const reasonBusy = "busy"

// AppLimitOptions bound what unauthenticated application logins may cost.
// Every application login runs argon2id (19 MiB and tens of milliseconds of
// CPU with the default costs) before the broker knows whether its name
// exists. These budgets decide, before the name is looked up and whatever
// the name, whether a login may run it now: over a budget it is refused at
// once (MQTT 5: 0x89 server busy; 3.1.1: 0x05), never queued.
//
// An "address" is an IPv4 address or an IPv6 /64 (one host usually holds
// a whole /64). Zero fields take the values of DefaultAppLimitOptions, or
// follow the CPUs and the rates as their comments say. The zero value
// keeps argon2id on at most half the CPUs.
type AppLimitOptions struct {
	Concurrency        int     // verifications running at once; 0 = max(1, GOMAXPROCS/2)
	ConcurrencyPerAddr int     // running at once for one address
	Rate               float64 // verifications started per second; 0 = 10 × Concurrency
	Burst              int     // of Rate; 0 = two seconds' worth, at least 2
	RatePerAddr        float64 // started per second for one address
	BurstPerAddr       int     // of RatePerAddr; 0 = two seconds' worth, at least 2

	// FailuresPerAddr failed logins from one address, whatever names they
	// use, are answered; then that address is refused (0x8A, as a throttled
	// terminal) until FailureRefill has given back one more.
	FailuresPerAddr int
	FailureRefill   time.Duration

	// MaxAddrs is how many addresses the limiter remembers; the least
	// recently seen one is forgotten first (a forgotten address starts
	// afresh). About 400 bytes each.
	MaxAddrs int
}

// DefaultAppLimitOptions returns the value the hook gives each zero field
// of AppLimitOptions that does not follow the CPUs or a rate (those stay
// zero here: Concurrency, Rate, Burst, BurstPerAddr).
func DefaultAppLimitOptions() AppLimitOptions {
	return AppLimitOptions{
		ConcurrencyPerAddr: 1,
		RatePerAddr:        2,
		FailuresPerAddr:    20,
		FailureRefill:      10 * time.Second,
		MaxAddrs:           10000,
	}
}

func (o AppLimitOptions) withDefaults() AppLimitOptions {
	def := DefaultAppLimitOptions()
	orDefault(&o.Concurrency, max(1, runtime.GOMAXPROCS(0)/2))
	orDefault(&o.ConcurrencyPerAddr, def.ConcurrencyPerAddr)
	orDefault(&o.Rate, 10*float64(o.Concurrency))
	orDefault(&o.Burst, twoSeconds(o.Rate))
	orDefault(&o.RatePerAddr, def.RatePerAddr)
	orDefault(&o.BurstPerAddr, twoSeconds(o.RatePerAddr))
	orDefault(&o.FailuresPerAddr, def.FailuresPerAddr)
	orDefault(&o.FailureRefill, def.FailureRefill)
	orDefault(&o.MaxAddrs, def.MaxAddrs)
	return o
}

func twoSeconds(perSecond float64) int {
	return int(max(2, math.Min(math.Ceil(2*perSecond), math.MaxInt32)))
}

// appLimit names the budget that refused a login (the "limit" attribute of
// its login_refused event).
type appLimit string

const (
	limitNone               appLimit = ""
	limitConcurrency        appLimit = "concurrency"
	limitConcurrencyPerAddr appLimit = "concurrency-per-addr"
	limitRate               appLimit = "rate"
	limitRatePerAddr        appLimit = "rate-per-addr"
	limitAddrs              appLimit = "addresses" // every remembered address is verifying
	limitFailuresPerAddr    appLimit = "failures-per-addr"
)

// appLimiter admits application password verifications within the budgets
// of AppLimitOptions. Every operation is O(1) under one mutex.
type appLimiter struct {
	opts   AppLimitOptions
	global *rate.Limiter

	mu       sync.Mutex
	inFlight int
	addrs    map[string]*list.Element // value *addrBudget
	lru      list.List                // front: most recently seen
}

// addrBudget is one address's share.
type addrBudget struct {
	key      string
	inFlight int
	rate     *rate.Limiter
	failures *rate.Limiter // a token per failure still allowed
}

func newAppLimiter(o AppLimitOptions) *appLimiter {
	o = o.withDefaults()
	return &appLimiter{
		opts:   o,
		global: rate.NewLimiter(rate.Limit(o.Rate), o.Burst),
		addrs:  make(map[string]*list.Element),
	}
}

// addrKey is the limiter's key of a remote host: the address itself, or its
// /64 for IPv6; a host that is no IP address (a test pipe) is its own key.
func addrKey(host string) string {
	a, err := netip.ParseAddr(host)
	if err != nil {
		return host
	}
	a = a.Unmap().WithZone("")
	if a.Is6() {
		return netip.PrefixFrom(a, 64).Masked().String()
	}
	return a.String()
}

// admit reserves a verification for host at now. It returns the address's
// budget, to be handed back to done, or the limit that refuses it.
func (l *appLimiter) admit(host string, now time.Time) (*addrBudget, appLimit) {
	l.mu.Lock()
	defer l.mu.Unlock()
	a := l.addr(addrKey(host), now)
	switch {
	case a == nil:
		return nil, limitAddrs
	case a.failures.TokensAt(now) < 1:
		return nil, limitFailuresPerAddr
	case a.inFlight >= l.opts.ConcurrencyPerAddr:
		return nil, limitConcurrencyPerAddr
	case l.inFlight >= l.opts.Concurrency:
		return nil, limitConcurrency
	case a.rate.TokensAt(now) < 1:
		return nil, limitRatePerAddr
	case !l.global.AllowN(now, 1):
		return nil, limitRate
	}
	a.rate.AllowN(now, 1) // there is a token: checked above, under mu
	a.inFlight++
	l.inFlight++
	return a, limitNone
}

// done hands back a verification admitted for a; failed charges the
// address one failure.
func (l *appLimiter) done(a *addrBudget, failed bool, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	a.inFlight--
	l.inFlight--
	if failed {
		a.failures.AllowN(now, 1)
	}
}

// running is the number of verifications running now.
func (l *appLimiter) running() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.inFlight
}

// addr returns the budget of key, marked most recently seen, creating it
// if needed. When the table is full it forgets the least recently seen
// address that has no verification running: at most Concurrency addresses
// have one, so the search from the back of the list takes at most
// Concurrency+1 steps. nil if every remembered address has one running
// (only when MaxAddrs <= Concurrency). Called with mu held.
func (l *appLimiter) addr(key string, now time.Time) *addrBudget {
	if el, ok := l.addrs[key]; ok {
		l.lru.MoveToFront(el)
		return el.Value.(*addrBudget)
	}
	if len(l.addrs) >= l.opts.MaxAddrs {
		el := l.lru.Back()
		for el != nil && el.Value.(*addrBudget).inFlight > 0 {
			el = el.Prev()
		}
		if el == nil {
			return nil
		}
		delete(l.addrs, el.Value.(*addrBudget).key)
		l.lru.Remove(el)
	}
	a := &addrBudget{
		key:      key,
		rate:     rate.NewLimiter(rate.Limit(l.opts.RatePerAddr), l.opts.BurstPerAddr),
		failures: rate.NewLimiter(rate.Every(l.opts.FailureRefill), l.opts.FailuresPerAddr),
	}
	l.addrs[key] = l.lru.PushFront(a)
	return a
}

// collectors are the limiter's metrics.
func (l *appLimiter) collectors() []prometheus.Collector {
	return []prometheus.Collector{prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "m2mguard_app_verifications_in_flight",
		Help: "Application password verifications (argon2id) running now.",
	}, func() float64 { return float64(l.running()) })}
}

// verifyApp runs the registry's VerifyApp for a login admitted to a, and
// hands the slot back however it ends. A wrong name or password is charged
// to the address; a store failure is not.
func (h *Hook) verifyApp(ctx context.Context, a *addrBudget, name string, password []byte) (app *keysvc.App, err error) {
	defer func() { h.apps.done(a, errors.Is(err, keysvc.ErrBadCredentials), h.opts.Now()) }()
	return h.reg.VerifyApp(ctx, name, password)
}

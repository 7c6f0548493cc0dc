package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
)

// scenario is one attack of the suite. Each runs against a broker process
// of its own: started, provisioned with the genuine terminal, set up,
// attacked, left idle for the cool-down, stopped.
type scenario struct {
	name  string
	title func(c *Config) string
	// flags are broker flags beyond those every broker gets.
	flags func(c *Config) []string
	// genuine: the genuine terminal logs in repeatedly from its own address
	// during the attack and during the cool-down.
	genuine bool
	// setup prepares the broker before the "before" figures (may be nil).
	setup func(ctx context.Context, e *env) error
	// attack runs the attack until it is over or ctx ends (the suite cancels
	// ctx when the broker passes the memory limit), and reports.
	attack func(ctx context.Context, e *env) (detail, error)
}

// detail is a scenario's own figures.
type detail interface {
	// rows are the figures for the table, in order.
	rows() []row
	// checks are the targets this scenario is judged by, given the suite's
	// common figures in r.
	checks(r *Result) []Check
}

type row struct{ name, value string }

// env is what a scenario's functions work with.
type env struct {
	cfg           *Config
	b             *brokerProc
	admin         *adminClient
	genuine       *terminal   // registered before setup
	terminals     []*terminal // more terminals, registered by setup
	attackDialer  *net.Dialer // from cfg.Attacker
	genuineDialer *net.Dialer // from cfg.Genuine
	log           io.Writer   // progress
	name          string
}

// progress writes one progress line.
func (e *env) progress(format string, args ...any) {
	fmt.Fprintf(e.log, "[%s] "+format+"\n", append([]any{e.name}, args...)...)
}

// Result is everything one scenario measured.
type Result struct {
	Scenario      string      `json:"scenario"`
	Title         string      `json:"title"`
	BrokerArgs    []string    `json:"broker_args"`
	AttackSeconds float64     `json:"attack_seconds"`
	RSS           RSS         `json:"rss"`
	LogBytes      int64       `json:"log_bytes_during_attack"`
	Genuine       *LoginStats `json:"genuine_during,omitempty"`
	GenuineAfter  *LoginStats `json:"genuine_after,omitempty"`
	Detail        detail      `json:"detail,omitempty"`
	Checks        []Check     `json:"checks,omitempty"`
	Notes         []string    `json:"notes,omitempty"`
	Shutdown      string      `json:"shutdown,omitempty"`
	Error         string      `json:"error,omitempty"`
}

// RSS is the broker's resident memory (VmRSS) in MiB: before the attack,
// at its end, the highest sample (every 100 ms) from the start of the
// attack to the end of the cool-down (work queued during the attack may
// still be running), and after the cool-down with the broker idle (nil if
// the broker was no longer running).
type RSS struct {
	Before          float64  `json:"before_mib"`
	End             float64  `json:"end_mib"`
	Peak            float64  `json:"peak_mib"`
	After           *float64 `json:"after_mib,omitempty"`
	CooldownSeconds float64  `json:"cooldown_seconds"`
}

// Growth is the peak minus the figure before the attack.
func (r RSS) Growth() float64 { return r.Peak - r.Before }

// Check is a target a scenario is judged by and whether this run met it.
type Check struct {
	What   string `json:"what"`
	Value  string `json:"value"`
	Target string `json:"target"`
	Met    bool   `json:"met"`
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// runScenario runs sc against a fresh broker started from bin in a
// directory under work.
func runScenario(ctx context.Context, cfg *Config, bin, work string, sc *scenario, log io.Writer) *Result {
	r := &Result{Scenario: sc.name, Title: sc.title(cfg)}
	e := &env{cfg: cfg, log: log, name: sc.name,
		attackDialer: newDialer(cfg.Attacker, 10*time.Second), genuineDialer: newDialer(cfg.Genuine, 10*time.Second)}
	fail := func(err error) *Result {
		r.Error = err.Error()
		e.progress("failed: %v", err)
		return r
	}
	flags := append([]string{"--mqtt-connect-timeout", cfg.ConnectTimeout.String()}, cfg.BrokerFlags...)
	if sc.flags != nil {
		flags = append(flags, sc.flags(cfg)...)
	}
	b, err := startBroker(ctx, bin, filepath.Join(work, sc.name), flags)
	if err != nil {
		return fail(err)
	}
	e.b = b
	r.BrokerArgs = b.Args
	defer func() {
		r.Shutdown = b.stop(10 * time.Second)
		e.progress("broker stopped: %s", r.Shutdown)
	}()
	if e.admin, err = newAdminClient(b.Admin, b.token); err != nil {
		return fail(err)
	}
	defer e.admin.close()
	e.progress("broker pid %d: mqtt tcp %s, ws %s, admin %s; log %s", b.Pid, b.TCP, b.WS, b.Admin, b.LogPath)

	if e.genuine, err = e.admin.register(ctx, newTerminal(genuineSN).id); err != nil {
		return fail(fmt.Errorf("register the genuine terminal: %w", err))
	}
	if sc.setup != nil {
		if err := sc.setup(ctx, e); err != nil {
			return fail(err)
		}
	}

	// brokerCtx ends the attack and the cool-down when the broker is
	// killed for passing the memory limit.
	brokerCtx, killed := context.WithCancel(ctx)
	defer killed()
	attackCtx, cancel := context.WithCancel(brokerCtx)
	defer cancel()
	started := time.Now()
	var attackOver atomic.Bool
	watch := watchMem(b.Pid, cfg.RSSLimitMiB<<20, 100*time.Millisecond, func(rss int64) {
		phase := "during the attack: attack stopped"
		if attackOver.Load() {
			phase = "during the cool-down"
		}
		r.Notes = append(r.Notes, fmt.Sprintf("broker RSS %.0f MiB passed the limit (--rss-limit-mib %d) %.1f s after the attack started, %s; broker killed",
			mib(rss), cfg.RSSLimitMiB, time.Since(started).Seconds(), phase))
		e.progress("RSS %.0f MiB over the limit: killing the broker", mib(rss))
		killed()
		b.kill()
	})
	defer watch.Stop()
	r.RSS.Before = mib(watch.resetPeak())
	logBefore := b.logSize()

	var wg sync.WaitGroup
	var during LoginStats
	if sc.genuine {
		wg.Add(1)
		go func() {
			defer wg.Done()
			during = probeLogins(attackCtx, e.genuineDialer, b.TCP, e.genuine, cfg.GenuineInterval, cfg.LoginTimeout)
		}()
	}
	e.progress("attack: %s", r.Title)
	det, err := sc.attack(attackCtx, e)
	r.AttackSeconds = time.Since(started).Seconds()
	attackOver.Store(true)
	cancel()
	wg.Wait()
	end, _ := watch.now()
	r.RSS.End = mib(end)
	r.LogBytes = b.logSize() - logBefore
	r.Detail = det
	if sc.genuine {
		r.Genuine = &during
	}
	if err != nil {
		_, peak := watch.now()
		r.RSS.Peak = mib(peak)
		return fail(err)
	}

	if brokerCtx.Err() == nil && b.alive() && cfg.Cooldown > 0 {
		e.progress("cool-down: %s idle", cfg.Cooldown)
		cctx, ccancel := context.WithTimeout(brokerCtx, cfg.Cooldown)
		t0 := time.Now()
		if sc.genuine {
			after := probeLogins(cctx, e.genuineDialer, b.TCP, e.genuine, cfg.GenuineInterval, cfg.LoginTimeout)
			r.GenuineAfter = &after
		}
		<-cctx.Done()
		ccancel()
		r.RSS.CooldownSeconds = time.Since(t0).Seconds()
		if brokerCtx.Err() == nil && b.alive() {
			after, _ := watch.now()
			a := mib(after)
			r.RSS.After = &a
		}
	}
	_, peak := watch.now()
	r.RSS.Peak = mib(peak)
	watch.Stop()
	if det != nil {
		r.Checks = det.checks(r)
	}
	return r
}

// startProgress prints line() every interval until ctx ends or the
// returned stop is called; stop waits for its goroutine.
func startProgress(ctx context.Context, e *env, interval time.Duration, line func() string) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				e.progress("%s", line())
			}
		}
	}()
	return func() { cancel(); <-done }
}

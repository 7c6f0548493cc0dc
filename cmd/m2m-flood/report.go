package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
)

// writeTable prints one scenario's result as a two-column table.
func writeTable(w io.Writer, r *Result) {
	fmt.Fprintf(w, "== %s: %s\n", r.Scenario, r.Title)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	put := func(name, format string, args ...any) {
		fmt.Fprintf(tw, "  %s\t%s\n", name, fmt.Sprintf(format, args...))
	}
	if len(r.BrokerArgs) > 0 {
		put("broker flags", "%s", strings.Join(r.BrokerArgs, " "))
	}
	if r.Error != "" {
		put("ERROR", "%s", r.Error)
	}
	put("attack", "%.1f s", r.AttackSeconds)
	if r.Detail != nil {
		for _, rw := range r.Detail.rows() {
			put(rw.name, "%s", rw.value)
		}
	}
	after := "no cool-down"
	switch {
	case r.RSS.After != nil:
		after = fmt.Sprintf("after %.0f s idle %.1f MiB", r.RSS.CooldownSeconds, *r.RSS.After)
	case r.RSS.CooldownSeconds > 0:
		after = "after the cool-down: n/a (broker not running)"
	}
	put("broker RSS", "before %.1f MiB, end %.1f MiB, peak %.1f MiB (growth %.1f MiB); %s",
		r.RSS.Before, r.RSS.End, r.RSS.Peak, r.RSS.Growth(), after)
	put("broker log during the attack", "%s", bytesText(r.LogBytes))
	if r.Genuine != nil {
		put("genuine logins during", "%s", r.Genuine)
	}
	if r.GenuineAfter != nil {
		put("genuine logins after", "%s", r.GenuineAfter)
	}
	if r.Shutdown != "" {
		put("broker shutdown", "%s", r.Shutdown)
	}
	for _, n := range r.Notes {
		put("NOTE", "%s", n)
	}
	tw.Flush()
	for _, c := range r.Checks {
		met := "met"
		if !c.Met {
			met = "NOT MET"
		}
		fmt.Fprintf(w, "  target %-7s %s: %s (want %s)\n", met, c.What, c.Value, c.Target)
	}
	fmt.Fprintln(w)
}

// bytesText formats a byte count with a binary unit.
func bytesText(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// outcomesText lists login outcomes, most frequent first, with the
// meaning of each code.
func outcomesText(m map[string]int64) string {
	type kv struct {
		k string
		n int64
	}
	var all []kv
	for k, n := range m {
		all = append(all, kv{k, n})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].n > all[j].n || all[i].n == all[j].n && all[i].k < all[j].k })
	var parts []string
	for _, e := range all {
		name := e.k
		if m, ok := codeNames[e.k]; ok && strings.HasPrefix(e.k, "0x") {
			name += " " + m
		} else if ok {
			name = m
		}
		parts = append(parts, fmt.Sprintf("%s: %d", name, e.n))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, "; ")
}

// errorsText lists the first error of each outcome.
func errorsText(m map[string]string) string {
	if len(m) == 0 {
		return "none"
	}
	var parts []string
	for k, v := range m {
		parts = append(parts, k+": "+v)
	}
	sort.Strings(parts)
	return strings.Join(parts, "; ")
}

// genuineCheck is the check every scenario with a genuine terminal makes:
// every login succeeded and the 99th percentile stayed under 100 ms.
func genuineCheck(s *LoginStats) Check {
	c := Check{What: "genuine terminal logins during the attack: all succeed, p99", Target: "0 failed, p99 < 100 ms"}
	if s == nil || s.Attempts == 0 {
		c.Value = "no login measured"
		return c
	}
	c.Value = fmt.Sprintf("%d of %d failed, p99 %.1f ms", s.Attempts-s.OK, s.Attempts, s.Latency.P99)
	c.Met = s.OK == s.Attempts && s.Latency.P99 < 100
	return c
}

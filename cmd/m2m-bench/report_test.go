package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSuiteMarkdownKeepsHandSections: a suite run replaces its own section
// of BENCHMARKS.md only; the hand-written text before and after it and the
// storm's section stay as they were, byte for byte, run after run.
func TestSuiteMarkdownKeepsHandSections(t *testing.T) {
	const (
		before   = "Hand text above the suite.\n\n"
		findings = "\n## Findings (written by hand after the run above)\n\n- kept finding\n\n"
		storm    = stormBegin + "\n## Reconnect storm\n\nold storm table\n" + stormEnd + "\n"
		after    = "\n### Reconnect storm: findings (written by hand)\n\n- kept too\n"
	)
	old := suiteBegin + "\n# Benchmarks: old\n\nold targets\n" + suiteEnd + "\n"
	res := &SuiteResult{Command: "m2m-bench suite --n 50", Started: time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC),
		Machine: machine(), Settings: SuiteSettings{N: 50, Rounds: 1},
		Ratios: []Ratio{{Name: "new ratio row", Value: 0.97, Rounds: []float64{0.97}, Target: ">= 0.95", Met: true}}}
	tests := []struct {
		name, doc, want string
	}{
		{"replaced in place", before + old + findings + storm + after, before + renderMarkdown(res) + findings + storm + after},
		{"absent: at the top", "# Hand-written\n\nkept\n" + storm, renderMarkdown(res) + "\n# Hand-written\n\nkept\n" + storm},
		{"no file", "", renderMarkdown(res)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			md := filepath.Join(t.TempDir(), "BENCHMARKS.md")
			if tt.doc != "" {
				if err := os.WriteFile(md, []byte(tt.doc), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			for run := range 2 { // the second run replaces the first's section
				if err := writeSuiteMarkdown(md, res); err != nil {
					t.Fatal(err)
				}
				data, err := os.ReadFile(md)
				if err != nil {
					t.Fatal(err)
				}
				if got := string(data); got != tt.want {
					t.Fatalf("run %d:\n%s\nwant:\n%s", run+1, got, tt.want)
				}
			}
		})
	}
	if s := renderMarkdown(res); !strings.Contains(s, "| new ratio row | **0.970** |") || strings.Contains(s, "old targets") {
		t.Errorf("section:\n%s", s)
	}
}

// TestReplaceSection: the storm's section goes at the end when absent and
// is replaced in place otherwise; the suite's section is left alone.
func TestReplaceSection(t *testing.T) {
	suite := suiteBegin + "\nsuite\n" + suiteEnd + "\n"
	doc := suite + "\nhand\n"
	sec1 := stormBegin + "\nstorm 1\n" + stormEnd + "\n"
	sec2 := stormBegin + "\nstorm 2\n" + stormEnd + "\n"
	got := replaceSection(doc, stormBegin, stormEnd, sec1, false)
	if want := doc + "\n" + sec1; got != want {
		t.Fatalf("appended:\n%q\nwant\n%q", got, want)
	}
	got = replaceSection(got+"\nafter\n", stormBegin, stormEnd, sec2, false)
	if want := doc + "\n" + sec2 + "\nafter\n"; got != want {
		t.Fatalf("replaced:\n%q\nwant\n%q", got, want)
	}
}

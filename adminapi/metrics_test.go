package adminapi_test

import (
	"bytes"
	"testing"

	"github.com/m2mguard/m2mguard/adminapi"
)

const scrape = `# HELP m2mguard_sessions Sessions.
# TYPE m2mguard_sessions gauge
m2mguard_sessions{kind="application"} 0
m2mguard_sessions{kind="terminal"} 3
m2mguard_admin_requests_total{route="GET /v1/terminals/{sn}",status="404"} 7
go_goroutines 12
process_start_time_seconds 1.7e+09
up_with_timestamp 1 1700000000000
not_a_number abc
m2mguard_sessions_total 5
`

func TestMetricsValue(t *testing.T) {
	for _, tc := range []struct {
		sample string
		want   float64
		ok     bool
	}{
		{`m2mguard_sessions{kind="terminal"}`, 3, true},
		{`m2mguard_sessions{kind="application"}`, 0, true},
		{`m2mguard_admin_requests_total{route="GET /v1/terminals/{sn}",status="404"}`, 7, true}, // spaces inside labels
		{"go_goroutines", 12, true},
		{"process_start_time_seconds", 1.7e9, true},
		{"up_with_timestamp", 1, true},
		{"m2mguard_sessions", 0, false}, // a family name is no sample
		{"not_a_number", 0, false},
		{"missing", 0, false},
		{"", 0, false},
		{"# HELP", 0, false},
	} {
		v, ok := adminapi.Metrics(scrape).Value(tc.sample)
		if v != tc.want || ok != tc.ok {
			t.Errorf("Value(%q) = %v, %t; want %v, %t", tc.sample, v, ok, tc.want, tc.ok)
		}
	}
}

// FuzzMetricsValue: any scrape and any sample name: no panic, and a
// value found is on a line that starts with the sample.
func FuzzMetricsValue(f *testing.F) {
	f.Add([]byte(scrape), `m2mguard_sessions{kind="terminal"}`)
	f.Add([]byte("a 1\nb"), "b")
	f.Add([]byte("x  +Inf 12\n"), "x")
	f.Fuzz(func(t *testing.T, data []byte, sample string) {
		if _, ok := adminapi.Metrics(data).Value(sample); ok && !bytes.HasPrefix(data, []byte(sample+" ")) && !bytes.Contains(data, []byte("\n"+sample+" ")) {
			t.Fatalf("found %q in %q", sample, data)
		}
	})
}

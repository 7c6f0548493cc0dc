package adminapi

import (
	"bytes"
	"strconv"
)

// Metrics is a scrape of /metrics, in the Prometheus text format.
type Metrics []byte

// Value returns the value of one sample, named with its labels exactly as
// the broker exposes them (label names sorted):
// `m2mguard_sessions{kind="terminal"}`, `go_goroutines`. ok is false if
// there is no such sample or its value is not a number.
func (m Metrics) Value(sample string) (v float64, ok bool) {
	prefix := []byte(sample + " ")
	for line := range bytes.Lines(m) {
		rest, found := bytes.CutPrefix(line, prefix)
		if !found || sample == "" || sample[0] == '#' {
			continue
		}
		value, _, _ := bytes.Cut(bytes.TrimSpace(rest), []byte(" ")) // a timestamp may follow
		f, err := strconv.ParseFloat(string(value), 64)
		return f, err == nil
	}
	return 0, false
}

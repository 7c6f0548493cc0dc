package sms

import (
	"net/http"
	"strconv"
	"testing"
	"time"
)

func TestRetryAfter(t *testing.T) {
	future := time.Now().Add(90 * time.Second).UTC().Format(http.TimeFormat)
	for _, tc := range []struct {
		code    int
		header  string
		want    time.Duration
		atLeast time.Duration // for dates: a lower bound
		ok      bool
	}{
		{429, "3", 3 * time.Second, 0, true},
		{503, "0", 0, 0, true},
		{503, " 7 ", 7 * time.Second, 0, true},
		{429, future, 0, 85 * time.Second, true},
		{429, "Sun, 06 Nov 1994 08:49:37 GMT", 0, 0, true}, // in the past: retry now
		{429, "", 0, 0, false},
		{429, "-1", 0, 0, false},
		{429, "1.5", 0, 0, false},
		{429, "soon", 0, 0, false},
		{429, "99999999999", 0, 0, false}, // beyond 32 bits of seconds
		{500, "3", 0, 0, false},           // only 429 and 503 count
		{200, "3", 0, 0, false},
	} {
		resp := &http.Response{StatusCode: tc.code, Header: http.Header{}}
		if tc.header != "" {
			resp.Header.Set("Retry-After", tc.header)
		}
		got, ok := retryAfter(resp)
		if ok != tc.ok || (tc.atLeast == 0 && got != tc.want) || got < tc.atLeast || got > 100*time.Second && tc.atLeast > 0 {
			t.Errorf("%d %q: got %v %v, want %v %v", tc.code, tc.header, got, ok, tc.want, tc.ok)
		}
	}
	if _, ok := retryAfter(nil); ok {
		t.Error("nil response")
	}
}

// FuzzRetryAfter: any header value parses to a wait of at least 0, and a
// plain number of seconds to exactly that.
func FuzzRetryAfter(f *testing.F) {
	for _, s := range []string{"0", "120", "Fri, 31 Dec 1999 23:59:59 GMT", "Monday, 02-Jan-06 15:04:05 MST", "", "-5", "1e3", "\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		resp := &http.Response{StatusCode: http.StatusTooManyRequests, Header: http.Header{"Retry-After": {v}}}
		d, ok := retryAfter(resp)
		if d < 0 || !ok && d != 0 {
			t.Fatalf("%q: %v %v", v, d, ok)
		}
		if n, err := strconv.ParseUint(v, 10, 32); err == nil && (!ok || d != time.Duration(n)*time.Second) {
			t.Fatalf("%q: %v %v, want %d s", v, d, ok, n)
		}
	})
}

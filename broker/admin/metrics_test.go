package admin_test

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
)

// TestAdminRequestMetricsBounded (SECURITY.md, attacks tried): every admin
// request is counted by route and status and timed by route on /metrics,
// and the route is the pattern the request matched, never its path: a
// client sending requests to ever new paths — to existing endpoints and
// unknown ones, with and without a token, even raw CONNECT requests —
// creates no label value of its own.
func TestAdminRequestMetricsBounded(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if status, body := e.call(token, "POST", "/v1/terminals", t1); status != http.StatusCreated {
		t.Fatalf("register: %d %s", status, body)
	}
	const n = 100
	for i := range n {
		e.call(token, "GET", fmt.Sprintf("/v1/terminals/X%d", i), nil)         // GET /v1/terminals/{sn}, 404
		e.call("", "GET", fmt.Sprintf("/probe-%d/admin.php", i), nil)          // "/", 401
		e.call(token, "DELETE", fmt.Sprintf("/v1/sessions/client-%d", i), nil) // DELETE /v1/sessions/{id}, 404
		rawConnect(t, e.srv.Listener.Addr().String(), fmt.Sprintf("/tunnel-%d", i))
	}

	want := map[string]int{
		`m2mguard_admin_requests_total{route="POST /v1/terminals",status="201"}`:        1,
		`m2mguard_admin_requests_total{route="GET /v1/terminals/{sn}",status="404"}`:    n,
		`m2mguard_admin_requests_total{route="/",status="401"}`:                         2 * n, // the probes and the CONNECTs
		`m2mguard_admin_requests_total{route="DELETE /v1/sessions/{id}",status="404"}`:  n,
		`m2mguard_admin_request_duration_seconds_count{route="GET /v1/terminals/{sn}"}`: n,
	}
	status, body := e.call(metricsToken, "GET", "/metrics", nil)
	if status != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", status, body)
	}
	for sample, n := range want {
		if v, ok := adminapi.Metrics(body).Value(sample); !ok || v != float64(n) {
			t.Errorf("%s = %v (found: %t), want %d", sample, v, ok, n)
		}
	}
	requestSeries := 0
	for line := range strings.Lines(string(body)) {
		if !strings.HasPrefix(line, "m2mguard_admin_") {
			continue
		}
		for _, own := range []string{"X1", "probe", "client-", "tunnel"} {
			if strings.Contains(line, own) {
				t.Errorf("a label value comes from a request's path: %s", line)
			}
		}
		if strings.HasPrefix(line, "m2mguard_admin_requests_total{") {
			requestSeries++
		}
	}
	// The four above (the scrape itself is counted once it is answered).
	if requestSeries != 4 {
		t.Errorf("%d series of m2mguard_admin_requests_total after %d requests to %d paths, want 4", requestSeries, 4*n+1, 4*n+1)
	}
}

// rawConnect sends "CONNECT <target> HTTP/1.1", which net/http's client
// does not send with a path, and reads the status line.
func rawConnect(t *testing.T, addr, target string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, addr)
	if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
		t.Fatalf("CONNECT %s: %v", target, err)
	}
}

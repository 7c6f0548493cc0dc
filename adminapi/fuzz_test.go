package adminapi_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/m2mguard/m2mguard/adminapi"
)

// FuzzClientAnswers: whatever a server answers (status, content type,
// body) to a read, an import (with and without bundles), a report, whoami,
// /metrics or /healthz, the client returns without panicking, and an error answer in
// JSON is an *adminapi.Error with its status. A real broker cannot
// produce these answers: a test server does.
func FuzzClientAnswers(f *testing.F) {
	var mu sync.Mutex
	var status int
	var ctype string
	var body []byte
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		w.Header().Set("Content-Type", ctype)
		w.WriteHeader(status)
		w.Write(body)
	}))
	defer srv.Close()
	c, err := adminapi.New(srv.URL, "fuzz-token-0123456789", nil)
	if err != nil {
		f.Fatal(err)
	}

	f.Add(200, "application/json", []byte(`{"sn":"T1","status":"active"}`))
	f.Add(404, "application/json", []byte(`{"error":"terminal T9 not found"}`))
	f.Add(400, "application/json; charset=utf-8", []byte(`{"error":"bad","field":"imei"}`))
	f.Add(200, "application/x-ndjson", []byte("{\"progress\":{\"done\":1,\"total\":2}}\n{\"report\":{\"rows\":2,\"created\":1,\"rejected\":[{\"line\":3,\"reason\":\"x\"}]}}\n"))
	f.Add(200, "application/x-ndjson", []byte("{\"report\":{\"rows\":1},\"error\":\"the import stopped: store\"}\n"))
	f.Add(200, "text/plain; version=0.0.4", []byte("go_goroutines 7\n"))
	f.Add(503, "application/json", []byte(`{"status":"unavailable","store":"unavailable","error":"the store does not answer"}`))
	f.Add(200, "text/html", []byte("<html>"))
	f.Add(500, "application/json", []byte(`[1,2`))
	f.Add(200, "application/x-ndjson", []byte("{\"bundle\":{\"sn\":\"T1\",\"up\":\"x\"}}\n{\"progress\":{\"done\":1,\"total\":1}}\n{\"report\":{\"rows\":1,\"created\":1}}\n"))
	f.Add(200, "application/x-ndjson", []byte("{\"row\":{\"sn\":\"T1\",\"expiring\":[\"up\"],\"last_seen\":{\"at\":\"2025-01-01T00:00:00Z\"}}}\n{\"progress\":{\"scanned\":1,\"matched\":1}}\n{\"done\":{\"scanned\":1,\"matched\":1}}\n"))
	f.Add(200, "application/x-ndjson", []byte("{\"row\":{\"sn\":\"T1\"}}\n{\"error\":\"the broker's store failed\"}\n"))
	f.Add(200, "application/json", []byte(`{"name":"alice","role":"read"}`))
	f.Fuzz(func(t *testing.T, st int, ct string, data []byte) {
		if st < 200 || st > 599 || strings.ContainsAny(ct, "\r\n") {
			t.Skip()
		}
		mu.Lock()
		status, ctype, body = st, ct, data
		mu.Unlock()
		ctx := context.Background()
		errs := []error{}
		_, err := c.GetTerminal(ctx, "T1")
		errs = append(errs, err)
		_, err = c.ImportTerminals(ctx, strings.NewReader("sn,imei,imsi\n"), func(adminapi.Progress) {})
		errs = append(errs, err)
		_, err = c.Import(ctx, strings.NewReader("sn,imei,imsi\n"), adminapi.ImportOptions{Bundle: func(adminapi.Bundle) error { return nil }})
		errs = append(errs, err)
		_, err = c.Report(ctx, adminapi.ReportQuery{Kind: adminapi.ReportNeverSeen}, func(adminapi.ReportRow) error { return nil }, func(adminapi.ReportProgress) {})
		errs = append(errs, err)
		_, err = c.WhoAmI(ctx)
		errs = append(errs, err)
		_, err = c.Metrics(ctx)
		errs = append(errs, err)
		_, err = c.Health(ctx)
		errs = append(errs, err)
		for _, err := range errs {
			var ae *adminapi.Error
			if errors.As(err, &ae) && ae.Status != st {
				t.Fatalf("status %d came back as %d", st, ae.Status)
			}
			if st/100 != 2 && st != http.StatusNoContent && err == nil {
				t.Fatalf("HTTP %d (%s) accepted", st, ct)
			}
		}
	})
}

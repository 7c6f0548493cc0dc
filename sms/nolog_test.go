package sms_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/m2mguard/m2mguard/sms"
	"github.com/m2mguard/m2mguard/sms/smsmetrics"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

// Secrets the child process sends; none may appear in anything it writes.
const (
	secretText   = "M2M1.acc.A1.0123456789abcdef.up=NEWPASSWORDnotinlogs"
	secretNumber = "+8613899990000"
	secretQuery  = "QUERYKEYnotinlogs"
	secretAuth   = "Bearer AUTHVALUEnotinlogs"
)

// TestSMSBodyNeverLogged runs sends that fail in every way (503 and 429
// retried, a 401, per-attempt timeouts, a gateway that is gone) in a child
// process with the sender's logger at debug on stderr and every error and
// the metrics printed, and scans all the child wrote: the text of the SMS
// (it carries new credentials), the number, the URL's query and the auth
// header value are never in it. The child is the whole process, so output
// of the retry library or of net/http would be caught too.
func TestSMSBodyNeverLogged(t *testing.T) {
	if os.Getenv("M2MGUARD_SMS_CHILD") == "1" {
		smsChild()
		return
	}
	t.Parallel()
	cmd := exec.Command(os.Args[0], "-test.run=^TestSMSBodyNeverLogged$", "-test.v")
	cmd.Env = append(os.Environ(), "M2MGUARD_SMS_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	for _, want := range []string{"retrying", "HTTP 401", "HTTP 503", "sending to http://", "m2mguard_sms_sends_total"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("the child's output lacks %q (did it run?):\n%s", want, out)
		}
	}
	for _, secret := range []string{secretText, "NEWPASSWORD", secretNumber, secretQuery, "AUTHVALUE"} {
		if strings.Contains(string(out), secret) {
			t.Errorf("the child's output contains %q", secret)
		}
	}
	t.Logf("child wrote %d bytes, none of them secret", len(out))
}

func smsChild() {
	gw, err := smstest.StartWith("127.0.0.1:0", smstest.Options{AuthHeader: "Authorization", AuthValue: secretAuth})
	if err != nil {
		panic(err)
	}
	reg := prometheus.NewRegistry()
	m, err := smsmetrics.New(reg)
	if err != nil {
		panic(err)
	}
	s := sms.HTTPSender{URL: gw.URL() + "/send?key=" + secretQuery, AuthHeader: "Authorization", AuthValue: secretAuth,
		Retries: 2, Backoff: time.Millisecond, Timeout: 200 * time.Millisecond, Observer: m,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	send := func(what string) {
		err := s.Send(context.Background(), secretNumber, secretText)
		fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
	}
	gw.FailNext(5)
	send("503 three times")
	gw.FailNextWith(1, http.StatusTooManyRequests)
	gw.RetryAfter("0")
	send("429 then sent")
	gw.FailNextWith(1, http.StatusUnauthorized)
	send("401")
	gw.Delay(time.Second)
	send("timeouts")
	gw.Delay(0)
	gw.Close()
	send("gateway gone")
	mfs, err := reg.Gather()
	if err != nil {
		panic(err)
	}
	for _, mf := range mfs {
		expfmt.MetricFamilyToText(os.Stdout, mf)
	}
}

package broker_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/sms"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

// TestSMSChangeHonoursRetryAfter: a credential change that must go by SMS
// (the terminal logs in without its basic key's digest) reaches a gateway
// that first answers 429 with Retry-After: 1. The broker's sender (sms.*
// keys) waits at least that long, the SMS arrives once, the metrics count
// one send and one retry, and no log line of the broker, at debug level,
// carries the text of the SMS (the new passwords).
func TestSMSChangeHonoursRetryAfter(t *testing.T) {
	t.Parallel()
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	gw.FailNextWith(1, http.StatusTooManyRequests)
	gw.RetryAfter("1")
	cfg := testConfig(t)
	cfg.SMS.URL = gw.URL() + "/send"
	cfg.SMS.Backoff, cfg.SMS.MaxBackoff = 10*time.Millisecond, 20*time.Millisecond
	b, logs := start(t, cfg)

	ctx := t.Context()
	tm, err := b.Service().Register(ctx, keysvc.RegisterRequest{SN: "SMS1", IMEI: "354494040518570", IMSI: "460020084678120", MSISDN: "+8613800000009"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Hook().StartChange(ctx, "SMS1", codec.WhatPwd); err != nil {
		t.Fatal(err)
	}
	c := login(t, b.Addr("tcp"), tm) // no bkd: the change goes by SMS
	defer c.Close()

	if !testwait.Until(20*time.Second, func() bool {
		return len(gw.Messages()) > 0 && seriesValue(t, b.Registry(), "m2mguard_sms_sends_total", sms.ResultSent) >= 1
	}) {
		t.Fatalf("no SMS sent (%d attempts)", gw.Sends())
	}
	at, msgs := gw.Arrivals(), gw.Messages()
	if len(at) != 2 || len(msgs) != 1 || msgs[0].To != "+8613800000009" {
		t.Fatalf("%d attempts, %d messages; want 2 and 1 to the terminal", len(at), len(msgs))
	}
	if gap := at[1].Sub(at[0]); gap < time.Second {
		t.Fatalf("retried %v after a 429 with Retry-After: 1", gap)
	}
	if got := seriesValue(t, b.Registry(), "m2mguard_sms_retries_total"); got != 1 {
		t.Fatalf("sms retries %v, want 1", got)
	}
	if !strings.Contains(logs.String(), "sms gateway attempt failed; retrying") {
		t.Fatalf("the retry is not logged:\n%s", logs)
	}
	for _, secret := range []string{msgs[0].Text, string(tm.Creds.Up)} {
		if strings.Contains(logs.String(), secret) {
			t.Fatal("the broker's log carries the text of the SMS")
		}
	}
}

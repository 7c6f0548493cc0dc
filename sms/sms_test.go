package sms_test

import (
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/sms"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

func TestHTTPSender(t *testing.T) {
	tests := []struct {
		name      string
		opts      smstest.Options
		sender    sms.HTTPSender
		fail      int
		failCode  int
		wantErr   bool
		wantCode  int
		wantSends int
		wantMsgs  int
	}{
		{name: "ok", wantSends: 1, wantMsgs: 1},
		{name: "auth ok", opts: smstest.Options{AuthHeader: "X-Key", AuthValue: "k1"},
			sender: sms.HTTPSender{AuthHeader: "X-Key", AuthValue: "k1"}, wantSends: 1, wantMsgs: 1},
		{name: "auth missing", opts: smstest.Options{AuthHeader: "X-Key", AuthValue: "k1"}, sender: sms.HTTPSender{Retries: 3},
			wantErr: true, wantCode: 401, wantSends: 1},
		{name: "503 retried", sender: sms.HTTPSender{Retries: 3}, fail: 2, wantSends: 3, wantMsgs: 1},
		{name: "503 too often", sender: sms.HTTPSender{Retries: 1}, fail: 5, wantErr: true, wantCode: 503, wantSends: 2},
		{name: "400 not retried", sender: sms.HTTPSender{Retries: 3}, fail: 1, failCode: 400, wantErr: true, wantCode: 400, wantSends: 1},
		{name: "429 retried", sender: sms.HTTPSender{Retries: 1}, fail: 1, failCode: 429, wantSends: 2, wantMsgs: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			gw, err := smstest.StartWith("127.0.0.1:0", tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer gw.Close()
			if tc.fail > 0 {
				code := tc.failCode
				if code == 0 {
					code = http.StatusServiceUnavailable
				}
				gw.FailNextWith(tc.fail, code)
			}
			s := tc.sender
			s.URL = gw.URL() + "/send"
			s.Backoff, s.MaxBackoff = time.Millisecond, 2*time.Millisecond
			err = s.Send(t.Context(), "+8613800000001", "M2M1.cfg.secret")
			if (err != nil) != tc.wantErr {
				t.Fatalf("err %v", err)
			}
			var se *sms.StatusError
			if tc.wantCode != 0 && (!errors.As(err, &se) || se.Code != tc.wantCode) {
				t.Fatalf("err %v, want HTTP %d", err, tc.wantCode)
			}
			if err != nil && containsText(err.Error()) {
				t.Fatal("the error carries the text")
			}
			if gw.Sends() != tc.wantSends || len(gw.Messages()) != tc.wantMsgs {
				t.Fatalf("sends %d msgs %d", gw.Sends(), len(gw.Messages()))
			}
			if tc.wantMsgs > 0 {
				m := gw.Messages()[0]
				if m.To != "+8613800000001" || m.Text != "M2M1.cfg.secret" || m.From != smstest.DefaultFrom || m.ID != 1 {
					t.Fatalf("recorded %+v", m)
				}
			}
		})
	}
}

func containsText(s string) bool {
	return strings.Contains(s, "M2M1.cfg") || strings.Contains(s, "secret")
}

func TestHTTPSenderTimeout(t *testing.T) {
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	gw.Delay(5 * time.Second)
	s := sms.HTTPSender{URL: gw.URL() + "/send", Timeout: 50 * time.Millisecond, Retries: 1, Backoff: time.Millisecond}
	if err := s.Send(t.Context(), "1", "x"); err == nil {
		t.Fatal("no timeout")
	}
	if gw.Sends() != 2 {
		t.Fatalf("sends %d", gw.Sends())
	}
	if len(gw.Messages()) != 0 {
		t.Fatal("recorded")
	}
}

func TestHTTPSenderNoURL(t *testing.T) {
	if err := (&sms.HTTPSender{}).Send(t.Context(), "1", "x"); !errors.Is(err, sms.ErrNoURL) {
		t.Fatal(err)
	}
}

func TestDecodeMessages(t *testing.T) {
	ms, err := sms.DecodeMessages([]byte(`[{"id":1,"to":"1","from":"2","text":"t","at":"2026-01-01T00:00:00Z"}]`))
	if err != nil || len(ms) != 1 || ms[0].ID != 1 || ms[0].Text != "t" {
		t.Fatalf("%v %v", ms, err)
	}
	for _, bad := range []string{``, `{}`, `[{"id":"x"}]`, `[{"idx":1}]`, `[] []`} {
		if _, err := sms.DecodeMessages([]byte(bad)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func FuzzDecodeMessages(f *testing.F) {
	f.Add([]byte(`[{"id":1,"to":"1","from":"2","text":"t","at":"2026-01-01T00:00:00Z"}]`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		ms, err := sms.DecodeMessages(data)
		if err != nil && ms != nil {
			t.Fatal("messages with an error")
		}
	})
}

package smstest_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"

	"github.com/m2mguard/m2mguard/sms"
	"github.com/m2mguard/m2mguard/sms/smstest"
)

func TestInbox(t *testing.T) {
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	s := &sms.HTTPSender{URL: gw.URL() + "/send"}
	for i, to := range []string{"111", "222", "111"} {
		if err := s.Send(context.Background(), to, fmt.Sprint("m", i)); err != nil {
			t.Fatal(err)
		}
	}
	get := func(path string) (int, []sms.Message) {
		resp, err := http.Get(gw.URL() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var ms []sms.Message
		json.NewDecoder(resp.Body).Decode(&ms)
		return resp.StatusCode, ms
	}
	if code, ms := get("/inbox/111"); code != 200 || len(ms) != 2 || ms[0].Text != "m0" || ms[1].Text != "m2" {
		t.Fatalf("%d %+v", code, ms)
	}
	if _, ms := get("/inbox/111?after=1"); len(ms) != 1 || ms[0].ID != 3 {
		t.Fatalf("%+v", ms)
	}
	if _, ms := get("/inbox/333"); ms == nil || len(ms) != 0 {
		t.Fatalf("empty inbox: %+v", ms)
	}
	if code, _ := get("/inbox/111?after=x"); code != 400 {
		t.Fatalf("bad after: %d", code)
	}
	resp, err := http.Post(gw.URL()+"/send", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("empty body: %d", resp.StatusCode)
	}
}

// A test starts a gateway, the platform side sends through HTTPSender and
// the terminal side reads its inbox.
func Example() {
	gw, err := smstest.Start("127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer gw.Close()
	sender := &sms.HTTPSender{URL: gw.URL() + "/send", Retries: 2}
	if err := sender.Send(context.Background(), "+8613800000001", "hello"); err != nil {
		panic(err)
	}
	m := gw.Messages()[0]
	fmt.Println(m.ID, m.To, m.From, m.Text)
	// Output: 1 +8613800000001 +10000000000 hello
}

package keysvc_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/keysvc/storetest"
)

func newTestService(t testing.TB) (*keysvc.Service, *storetest.Clock) {
	t.Helper()
	s, err := boltstore.Open(filepath.Join(t.TempDir(), "db"), boltstore.Options{MasterKey: bytes.Repeat([]byte{3}, 32), NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	clock := storetest.NewClock(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	svc, err := keysvc.New(keysvc.Options{Store: s, Now: clock.Now, PasswordLifetime: 365 * 24 * time.Hour,
		AppHash: keysvc.AppHashParams{Time: 1, Memory: 64}})
	if err != nil {
		t.Fatal(err)
	}
	return svc, clock
}

func isAlnum(p []byte) bool {
	for _, c := range p {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return false
		}
	}
	return true
}

func TestRegister(t *testing.T) {
	svc, clock := newTestService(t)
	ctx := context.Background()
	good := keysvc.RegisterRequest{SN: "R1", IMEI: "356938035643809", IMSI: "460001234567890"}
	for _, tc := range []struct {
		name string
		mod  func(r *keysvc.RegisterRequest)
		want error
	}{
		{"ok", func(r *keysvc.RegisterRequest) {}, nil},
		{"duplicate", func(r *keysvc.RegisterRequest) {}, keysvc.ErrExists},
		{"md5 with msisdn", func(r *keysvc.RegisterRequest) { r.SN, r.Alg, r.MSISDN = "R2", codec.MD5, "+8613800138000" }, nil},
		{"bad sn", func(r *keysvc.RegisterRequest) { r.SN = "R_3" }, keysvc.ErrInvalid},
		{"bad imsi", func(r *keysvc.RegisterRequest) { r.SN, r.IMSI = "R3", "46" }, keysvc.ErrInvalid},
		{"bad msisdn", func(r *keysvc.RegisterRequest) { r.SN, r.MSISDN = "R3", "call me" }, keysvc.ErrInvalid},
		{"bad alg", func(r *keysvc.RegisterRequest) { r.SN, r.Alg = "R3", 9 }, keysvc.ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := good
			tc.mod(&r)
			rec, err := svc.Register(ctx, r)
			if tc.want != nil {
				if !errors.Is(err, tc.want) {
					t.Fatalf("err = %v, want %v", err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			c := rec.Creds
			if len(c.Up) != 16 || len(c.Down) != 16 || !isAlnum(c.Up) || !isAlnum(c.Down) || bytes.Equal(c.Up, c.Down) {
				t.Fatal("passwords: want two different 16-character [A-Za-z0-9] strings")
			}
			if len(c.BK) != codec.BasicKeySize || c.BKExp != codec.Never {
				t.Fatal("bk: want 32 bytes that never expire")
			}
			if want := uint32(clock.Now().Add(365 * 24 * time.Hour).Unix()); c.UpExp != want || c.DownExp != want {
				t.Fatal("password expiry not from PasswordLifetime")
			}
			if r.Alg == 0 && rec.Alg != codec.HS256 || rec.Status != keysvc.StatusActive {
				t.Fatal("defaults: want hs256, active")
			}
			got, err := svc.Get(ctx, r.SN)
			if err != nil {
				t.Fatal(err)
			}
			if d := storetest.Diff(got, rec); d != "" {
				t.Fatalf("stored record differs in: %s", d)
			}
		})
	}
}

func TestStatusListDelete(t *testing.T) {
	svc, _ := newTestService(t)
	ctx := context.Background()
	for _, sn := range []string{"C", "A", "B"} {
		if _, err := svc.Register(ctx, keysvc.RegisterRequest{SN: sn, IMEI: "356938035643809", IMSI: "460001234567890"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := svc.Lookup(ctx, "B"); err != nil { // cache it
		t.Fatal(err)
	}
	if _, err := svc.SetStatus(ctx, "B", keysvc.StatusDisabled); err != nil {
		t.Fatal(err)
	}
	if rec, err := svc.Lookup(ctx, "B"); err != nil || rec.Status != keysvc.StatusDisabled {
		t.Fatalf("lookup after a local write: %v, status not fresh", err)
	}
	if _, err := svc.SetStatus(ctx, "B", "gone"); !errors.Is(err, keysvc.ErrInvalid) {
		t.Fatalf("bad status: %v", err)
	}
	page, next, err := svc.List(ctx, "", 2)
	if err != nil || len(page) != 2 || page[0].SN != "A" || page[1].SN != "B" || next != "B" {
		t.Fatalf("first page: %v %q", err, next)
	}
	page, next, err = svc.List(ctx, next, 2)
	if err != nil || len(page) != 1 || page[0].SN != "C" || next != "" {
		t.Fatalf("second page: %v %q", err, next)
	}
	if err := svc.Delete(ctx, "B"); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Lookup(ctx, "B"); !errors.Is(err, keysvc.ErrNotFound) {
		t.Fatalf("lookup after delete: %v", err)
	}
	if err := svc.Delete(ctx, "B"); !errors.Is(err, keysvc.ErrNotFound) {
		t.Fatalf("delete twice: %v", err)
	}
}

func TestImport(t *testing.T) {
	svc, _ := newTestService(t)
	ctx := context.Background()
	if _, err := svc.Register(ctx, keysvc.RegisterRequest{SN: "OLD1", IMEI: "356938035643809", IMSI: "460001234567890"}); err != nil {
		t.Fatal(err)
	}
	bk := strings.Repeat("0f", 32)
	in := "sn,imei,imsi,msisdn,alg,up,down,bk\n" +
		"I1,356938035643809,460001234567890,,,,,\n" + // line 2: all generated
		"I2,356938035643809,460001234567890,8613800138000,md5,upSecret1,downSecret1," + bk + "\n" +
		"I3,bad,460001234567890,,,,,\n" + // line 4
		"I1,356938035643809,460001234567890,,,,,\n" + // line 5: duplicate of line 2
		"OLD1,356938035643809,460001234567890,,,,,\n" + // line 6: exists
		"I4,356938035643809\n" + // line 7: field count
		"I5,356938035643809,460001234567890,,,upSecret1,,\n" + // line 8: up without down
		"I6,\"35693803\"5643809,460001234567890,,,,,\n" + // line 9: bare quote
		"I7,356938035643809,460001234567890,,hs256,,,\n" // line 10
	var progress [][2]int
	rep, err := svc.Import(ctx, strings.NewReader(in), keysvc.ImportOptions{BatchSize: 2,
		Progress: func(done, total int) { progress = append(progress, [2]int{done, total}) }})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Rows != 9 || rep.Created != 3 {
		t.Fatalf("rows %d created %d, want 9 and 3", rep.Rows, rep.Created)
	}
	wantLines := []int{4, 5, 6, 7, 8, 9}
	if len(rep.Rejected) != len(wantLines) {
		t.Fatalf("rejected %+v, want lines %v", rep.Rejected, wantLines)
	}
	for i, r := range rep.Rejected {
		if r.Line != wantLines[i] || r.Reason == "" {
			t.Fatalf("rejected[%d] = line %d reason %q, want line %d", i, r.Line, r.Reason, wantLines[i])
		}
		if strings.Contains(r.Reason, "Secret") {
			t.Fatal("a reason repeats a secret")
		}
	}
	if rep.Rejected[2].SN != "OLD1" || rep.Rejected[2].Reason != "exists" {
		t.Fatalf("existing terminal: %+v", rep.Rejected[2])
	}
	if len(progress) == 0 || progress[len(progress)-1] != [2]int{9, 9} {
		t.Fatalf("progress %v, want to end at 9/9 (rows read, stored or rejected)", progress)
	}
	i2, err := svc.Get(ctx, "I2")
	if err != nil {
		t.Fatal(err)
	}
	if string(i2.Creds.Up) != "upSecret1" || string(i2.Creds.Down) != "downSecret1" || i2.Creds.BK[0] != 0x0f || i2.Alg != codec.MD5 || i2.MSISDN != "8613800138000" {
		t.Fatal("imported secrets, alg or msisdn not stored as given")
	}
	for _, h := range []string{"", "sn,imei,msisdn,alg\n", "sn,imei,imsi,msisdn,alg,color\n", "sn,sn,imei,imsi,msisdn,alg\n"} {
		if _, err := svc.Import(ctx, strings.NewReader(h), keysvc.ImportOptions{}); !errors.Is(err, keysvc.ErrInvalid) {
			t.Fatalf("header %q: err = %v, want ErrInvalid", h, err)
		}
	}
}

func TestLookupHitAllocs(t *testing.T) {
	svc, _ := newTestService(t)
	ctx := context.Background()
	if _, err := svc.Register(ctx, keysvc.RegisterRequest{SN: "H1", IMEI: "356938035643809", IMSI: "460001234567890"}); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Lookup(ctx, "H1"); err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() { svc.Lookup(ctx, "H1") }); n != 0 {
		t.Fatalf("cached lookup allocates %v times, want 0", n)
	}
}

func TestSessionKey(t *testing.T) {
	svc, _ := newTestService(t)
	a, err := svc.NewSessionKey(context.Background(), "A1")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := svc.NewSessionKey(context.Background(), "A1")
	if len(a) != codec.SessionKeySize || bytes.Equal(a, b) {
		t.Fatal("session keys: want fresh 32-byte keys")
	}
}

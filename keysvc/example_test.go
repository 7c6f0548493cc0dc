package keysvc_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strings"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

// exampleService opens a throw-away embedded store. In production the
// master key comes from boltstore.LoadOrCreateMasterKey.
func exampleService() (*keysvc.Service, func()) {
	dir, err := os.MkdirTemp("", "keysvc-example")
	if err != nil {
		log.Fatal(err)
	}
	store, err := boltstore.Open(filepath.Join(dir, "m2mguard.db"), boltstore.Options{MasterKey: bytes.Repeat([]byte{9}, 32)})
	if err != nil {
		log.Fatal(err)
	}
	svc, err := keysvc.New(keysvc.Options{Store: store})
	if err != nil {
		log.Fatal(err)
	}
	return svc, func() { store.Close(); os.RemoveAll(dir) }
}

func ExampleService_Register() {
	svc, done := exampleService()
	defer done()
	t, err := svc.Register(context.Background(), keysvc.RegisterRequest{
		SN: "SN0001", IMEI: "356938035643809", IMSI: "460001234567890"})
	if err != nil {
		log.Fatal(err)
	}
	// Hand t.Creds to the terminal's provisioning; never log them.
	fmt.Println(t.SN, t.Alg, t.Status, len(t.Creds.Up), len(t.Creds.BK))
	// Output: SN0001 hs256 active 16 32
}

func ExampleService_Import() {
	svc, done := exampleService()
	defer done()
	csv := "sn,imei,imsi,msisdn,alg\n" +
		"SN0001,356938035643809,460001234567890,8613800138000,hs256\n" +
		"SN0002,35693803564380X,460001234567890,,md5\n"
	rep, err := svc.Import(context.Background(), strings.NewReader(csv), keysvc.ImportOptions{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("created", rep.Created)
	for _, r := range rep.Rejected {
		fmt.Println("line", r.Line, r.SN, "rejected")
	}
	// Output:
	// created 1
	// line 3 SN0002 rejected
}

// A change of the passwords: start it, deliver the new values (cfg or
// SMS), and commit when the terminal acks or logs in with the new up.
func ExampleService_CommitChange() {
	svc, done := exampleService()
	defer done()
	ctx := context.Background()
	if _, err := svc.Register(ctx, keysvc.RegisterRequest{SN: "SN0001", IMEI: "356938035643809", IMSI: "460001234567890"}); err != nil {
		log.Fatal(err)
	}
	ch, err := svc.StartChange(ctx, "SN0001", keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher, Origin: keysvc.OriginTerminal})
	if err != nil {
		log.Fatal(err)
	}
	_, err = svc.StartChange(ctx, "SN0001", keysvc.ChangeRequest{What: codec.WhatBK, Mode: codec.ModeCipher})
	fmt.Println("second change busy:", errors.Is(err, keysvc.ErrBusy))

	t, err := svc.CommitChange(ctx, "SN0001", ch.RID)
	if err != nil {
		log.Fatal(err)
	}
	_, again := svc.CommitChange(ctx, "SN0001", ch.RID) // a lost ack, repeated: fine
	fmt.Println("committed:", t.Pending == nil, t.LastCommitted == ch.RID, again == nil)
	// Output:
	// second change busy: true
	// committed: true true true
}

// MatchUplink on the CONNECT path: verify against the current and the
// pending up password; a match with the pending one commits the change.
func ExampleTerminal_MatchUplink() {
	svc, done := exampleService()
	defer done()
	ctx := context.Background()
	t, _ := svc.Register(ctx, keysvc.RegisterRequest{SN: "SN0001", IMEI: "356938035643809", IMSI: "460001234567890"})
	ch, _ := svc.StartChange(ctx, "SN0001", keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher})

	// The terminal already switched to the new password (its ack was lost).
	login := codec.Login{Identity: t.Identity(), Alg: codec.HS256, TS: 1700000000, Nonce: 1}
	if _, err := login.Sign(ch.New.Up); err != nil {
		log.Fatal(err)
	}
	rec, err := svc.Lookup(ctx, "SN0001")
	if err != nil {
		log.Fatal(err)
	}
	m := rec.MatchUplink(login.Verify)
	fmt.Println(m)
	if m == keysvc.MatchPending {
		if _, err := svc.CommitChange(ctx, "SN0001", rec.Pending.RID); err != nil {
			log.Fatal(err)
		}
	}
	// Output: pending
}

func ExampleService_VerifyApp() {
	svc, done := exampleService()
	defer done()
	ctx := context.Background()
	if _, err := svc.AddApp(ctx, keysvc.AddAppRequest{Name: "billing", Password: []byte("correct horse battery")}); err != nil {
		log.Fatal(err)
	}
	a, err := svc.VerifyApp(ctx, "billing", []byte("correct horse battery"))
	fmt.Println(err == nil, a.Subscribe, a.Publish)
	_, err = svc.VerifyApp(ctx, "billing", []byte("wrong"))
	fmt.Println(errors.Is(err, keysvc.ErrBadCredentials))
	// Output:
	// true [m2m/+/up/#] [m2m/+/down/#]
	// true
}

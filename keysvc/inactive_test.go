package keysvc_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// TestNoChangeForInactiveTerminal: disabling cancels the pending change in
// the same write, and while a terminal is disabled no change starts, is
// marked delivered or commits — also one started before the disable.
func TestNoChangeForInactiveTerminal(t *testing.T) {
	svc, _ := newTestService(t)
	ctx := context.Background()
	reg := keysvc.RegisterRequest{SN: "D1", IMEI: "356938035643809", IMSI: "460001234567890", MSISDN: "8613800000001"}
	before, err := svc.Register(ctx, reg)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := svc.StartChange(ctx, "D1", keysvc.ChangeRequest{What: codec.WhatAll, Mode: codec.ModeCipher})
	if err != nil {
		t.Fatal(err)
	}
	rec, cancelled, err := svc.Disable(ctx, "D1")
	if err != nil || cancelled == nil || cancelled.RID != ch.RID {
		t.Fatalf("disable: %v, cancelled %v, want rid %s", err, cancelled, ch.RID)
	}
	if rec.Status != keysvc.StatusDisabled || rec.Pending != nil {
		t.Fatalf("after disable: status %s, pending %v", rec.Status, rec.Pending)
	}
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"start", func() error {
			_, err := svc.StartChange(ctx, "D1", keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher})
			return err
		}},
		{"mark delivered", func() error { _, err := svc.MarkDelivered(ctx, "D1", ch.RID, codec.ModeCipher); return err }},
		{"commit the cancelled change", func() error { _, err := svc.CommitChange(ctx, "D1", ch.RID); return err }},
	} {
		if err := tc.call(); !errors.Is(err, keysvc.ErrInactive) {
			t.Errorf("%s on a disabled terminal: %v, want ErrInactive", tc.name, err)
		}
	}
	rec, err = svc.Get(ctx, "D1")
	if err != nil || !bytes.Equal(rec.Creds.Up, before.Creds.Up) || rec.LastCommitted != 0 {
		t.Fatalf("credentials changed while disabled: %v", err)
	}
	if _, cancelled, err := svc.Disable(ctx, "D1"); err != nil || cancelled != nil {
		t.Fatalf("disable again: %v, cancelled %v", err, cancelled)
	}
	// Enabled again, the old values are current and changes work.
	if _, err := svc.SetStatus(ctx, "D1", keysvc.StatusActive); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.StartChange(ctx, "D1", keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher}); err != nil {
		t.Fatalf("start after enable: %v", err)
	}
}

// TestRekey: every credential is replaced out of band, a pending change is
// cancelled, the status is kept.
func TestRekey(t *testing.T) {
	svc, _ := newTestService(t)
	ctx := context.Background()
	old, err := svc.Register(ctx, keysvc.RegisterRequest{SN: "K1", IMEI: "356938035643809", IMSI: "460001234567890"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.StartChange(ctx, "K1", keysvc.ChangeRequest{What: codec.WhatBK, Mode: codec.ModeCipher}); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.SetStatus(ctx, "K1", keysvc.StatusDisabled); err != nil {
		t.Fatal(err)
	}
	rec, err := svc.Rekey(ctx, "K1")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(rec.Creds.Up, old.Creds.Up) || bytes.Equal(rec.Creds.Down, old.Creds.Down) || bytes.Equal(rec.Creds.BK, old.Creds.BK) {
		t.Fatal("a credential was kept")
	}
	if rec.Pending != nil || rec.Status != keysvc.StatusDisabled {
		t.Fatalf("pending %v, status %s", rec.Pending, rec.Status)
	}
	if got, err := svc.Get(ctx, "K1"); err != nil || !bytes.Equal(got.Creds.Up, rec.Creds.Up) {
		t.Fatalf("stored: %v", err)
	}
	if _, err := svc.Rekey(ctx, "NONE"); !errors.Is(err, keysvc.ErrNotFound) {
		t.Fatalf("unknown: %v", err)
	}
}

package keysvc_test

import (
	"bytes"
	"context"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

// TestOnWriteReportsEveryWrite: every operation that writes a terminal
// record tells Options.OnWrite once, with its sn and op, and an operation
// that writes nothing tells nothing. A fleet drops the other brokers'
// cached records on these calls.
func TestOnWriteReportsEveryWrite(t *testing.T) {
	store, err := boltstore.Open(filepath.Join(t.TempDir(), "db"), boltstore.Options{MasterKey: bytes.Repeat([]byte{3}, 32), NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	var mu sync.Mutex
	var got []keysvc.Write
	svc, err := keysvc.New(keysvc.Options{Store: store, ChangeDeadline: time.Hour, OnWrite: func(w keysvc.Write) {
		mu.Lock()
		got = append(got, w)
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const sn = "W1"
	var rid codec.ID
	for _, tc := range []struct {
		name string
		do   func() error
		want []keysvc.Write // nil: nothing written
	}{
		{"register", func() error {
			_, err := svc.Register(ctx, keysvc.RegisterRequest{SN: sn, IMEI: "356938035643809", IMSI: "460001234567890"})
			return err
		}, []keysvc.Write{{SN: sn, Op: keysvc.OpRegister}}},
		{"enable an active terminal", func() error { _, err := svc.SetStatus(ctx, sn, keysvc.StatusActive); return err }, nil},
		{"change start", func() error {
			ch, err := svc.StartChange(ctx, sn, keysvc.ChangeRequest{What: codec.WhatPwd, Mode: codec.ModeCipher})
			if ch != nil {
				rid = ch.RID
			}
			return err
		}, []keysvc.Write{{SN: sn, Op: keysvc.OpChangeStart}}},
		{"delivered", func() error { _, err := svc.MarkDelivered(ctx, sn, rid, codec.ModeCipher); return err }, []keysvc.Write{{SN: sn, Op: keysvc.OpDelivered}}},
		{"delivered again", func() error { _, err := svc.MarkDelivered(ctx, sn, rid, codec.ModeCipher); return err }, nil},
		{"commit", func() error { _, err := svc.CommitChange(ctx, sn, rid); return err }, []keysvc.Write{{SN: sn, Op: keysvc.OpCommit}}},
		{"commit again (idempotent)", func() error { _, err := svc.CommitChange(ctx, sn, rid); return err }, nil},
		{"expire with nothing pending", func() error { _, err := svc.ExpireChange(ctx, sn); return err }, nil},
		{"rekey", func() error { _, err := svc.Rekey(ctx, sn); return err }, []keysvc.Write{{SN: sn, Op: keysvc.OpRekey}}},
		{"disable", func() error { _, _, err := svc.Disable(ctx, sn); return err }, []keysvc.Write{{SN: sn, Op: keysvc.OpStatus}}},
		{"enable", func() error { _, err := svc.SetStatus(ctx, sn, keysvc.StatusActive); return err }, []keysvc.Write{{SN: sn, Op: keysvc.OpStatus}}},
		{"delete", func() error { return svc.Delete(ctx, sn) }, []keysvc.Write{{SN: sn, Op: keysvc.OpDelete}}},
		{"delete a missing terminal", func() error { svc.Delete(ctx, sn); return nil }, nil},
		{"import", func() error {
			_, err := svc.Import(ctx, strings.NewReader("sn,imei,imsi\nW2,356938035643809,460001234567890\nW2,356938035643809,460001234567890\n"), keysvc.ImportOptions{})
			return err
		}, []keysvc.Write{{SN: "W2", Op: keysvc.OpRegister}}},
	} {
		mu.Lock()
		got = nil
		mu.Unlock()
		if err := tc.do(); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		mu.Lock()
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: OnWrite got %v, want %v", tc.name, got, tc.want)
		}
		mu.Unlock()
	}
}

// TestInvalidateDropsCachedRecords: a record cached by Lookup and changed
// by another writer (another broker: a Service of its own on the same
// store) is read again after Invalidate; InvalidateAll drops every entry.
func TestInvalidateDropsCachedRecords(t *testing.T) {
	store, err := boltstore.Open(filepath.Join(t.TempDir(), "db"), boltstore.Options{MasterKey: bytes.Repeat([]byte{3}, 32), NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	reader, _ := keysvc.New(keysvc.Options{Store: store})
	writer, _ := keysvc.New(keysvc.Options{Store: store})
	ctx := context.Background()
	for _, sn := range []string{"I1", "I2"} {
		if _, err := writer.Register(ctx, keysvc.RegisterRequest{SN: sn, IMEI: "356938035643809", IMSI: "460001234567890"}); err != nil {
			t.Fatal(err)
		}
		if _, err := reader.Lookup(ctx, sn); err != nil {
			t.Fatal(err)
		}
		if _, _, err := writer.Disable(ctx, sn); err != nil {
			t.Fatal(err)
		}
		if got, _ := reader.Lookup(ctx, sn); got.Status != keysvc.StatusActive {
			t.Fatal("the test needs a cached record")
		}
	}
	reader.Invalidate("I1")
	if got, _ := reader.Lookup(ctx, "I1"); got.Status != keysvc.StatusDisabled {
		t.Errorf("after Invalidate: %s", got.Status)
	}
	if got, _ := reader.Lookup(ctx, "I2"); got.Status != keysvc.StatusActive {
		t.Fatal("I2 was dropped by Invalidate(I1)")
	}
	reader.InvalidateAll()
	if got, _ := reader.Lookup(ctx, "I2"); got.Status != keysvc.StatusDisabled {
		t.Errorf("after InvalidateAll: %s", got.Status)
	}
}

package vaultstore

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

func sampleTerminal() *keysvc.Terminal {
	now := time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)
	return &keysvc.Terminal{
		SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120", MSISDN: "8613800000000",
		Alg: codec.HS256, Status: keysvc.StatusActive, RequireEncryption: true,
		Creds: keysvc.Credentials{
			Up: []byte("vkwF2SJaQ7mXc4Lp"), UpExp: codec.Never,
			Down: []byte("Uo3aHCbGz8RtY2Nw"), DownExp: 1900000000,
			BK: bytes.Repeat([]byte{0xab}, 32), BKExp: codec.Never,
		},
		Pending: &keysvc.Change{
			RID: 0x1111222233334444, What: codec.WhatAll, Mode: codec.ModeSMS, Origin: "operator",
			Started: now, Deadline: now.Add(24 * time.Hour),
			New: keysvc.Credentials{
				Up: []byte("N3wUpPassw0rdAAA"), UpExp: codec.Never,
				Down: []byte("N3wDownPassw0rdB"), DownExp: codec.Never,
				BK: bytes.Repeat([]byte{0xcd}, 32), BKExp: codec.Never,
			},
		},
		LastCommitted: 7, Created: now, Updated: now,
	}
}

// roundTrip passes an entry through JSON the way Vault returns it.
func TestRecordRoundTrip(t *testing.T) {
	for _, pending := range []bool{true, false} {
		want := sampleTerminal()
		if !pending {
			want.Pending = nil
		}
		got, err := decodeTerminal(encodeTerminal(want), 3)
		if err != nil {
			t.Fatalf("decode: %v", err)
		}
		want.Version = 3
		if !equalTerminal(got, want) {
			t.Fatalf("round trip changed the record (pending=%v)", pending)
		}
	}
}

func TestRecordRefuses(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(m map[string]any)
		field string
	}{
		{"missing up", func(m map[string]any) { delete(m, "up") }, `"up"`},
		{"short password", func(m map[string]any) { m["down"] = "short" }, `"down"`},
		{"bk not hex", func(m map[string]any) { m["bk"] = "zz" }, `"bk"`},
		{"bk short", func(m map[string]any) { m["bk"] = "abcd" }, `"bk"`},
		{"alg", func(m map[string]any) { m["alg"] = "sha1" }, `"alg"`},
		{"status", func(m map[string]any) { m["status"] = "gone" }, `"status"`},
		{"exp", func(m map[string]any) { m["upexp"] = "-1" }, `"upexp"`},
		{"number type", func(m map[string]any) { m["upexp"] = 5 }, `"upexp"`},
		{"huge field", func(m map[string]any) { m["msisdn"] = string(make([]byte, 300)) }, `"msisdn"`},
		{"pending what", func(m map[string]any) { m["pending_what"] = "key" }, `"pending_what"`},
		{"imei", func(m map[string]any) { m["imei"] = "12" }, `"sn/imei/imsi"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := encodeTerminal(sampleTerminal())
			tc.edit(m)
			_, err := decodeTerminal(m, 1)
			if !errors.Is(err, keysvc.ErrInvalid) || !bytes.Contains([]byte(err.Error()), []byte(tc.field)) {
				t.Fatalf("got %v, want ErrInvalid naming %s", err, tc.field)
			}
			if bytes.Contains([]byte(err.Error()), []byte("vkwF2SJaQ7mXc4Lp")) {
				t.Fatal("error echoes a password")
			}
		})
	}
}

func FuzzDecodeTerminal(f *testing.F) {
	m := encodeTerminal(sampleTerminal())
	f.Add(m["up"].(string), m["bk"].(string), m["upexp"].(string), m["pending_rid"].(string), m["created"].(string))
	f.Fuzz(func(t *testing.T, up, bk, upexp, rid, created string) {
		m := encodeTerminal(sampleTerminal())
		m["up"], m["bk"], m["upexp"], m["pending_rid"], m["created"] = up, bk, upexp, rid, created
		got, err := decodeTerminal(m, 1)
		if err != nil {
			return
		}
		again, err := decodeTerminal(encodeTerminal(got), 1)
		if err != nil || !equalTerminal(got, again) {
			t.Fatalf("a decoded record does not survive a second round trip: %v", err)
		}
	})
}

func equalTerminal(a, b *keysvc.Terminal) bool {
	if (a.Pending == nil) != (b.Pending == nil) {
		return false
	}
	if a.Pending != nil {
		pa, pb := *a.Pending, *b.Pending
		if !equalCreds(pa.New, pb.New) || pa.RID != pb.RID || pa.What != pb.What || pa.Mode != pb.Mode ||
			pa.Origin != pb.Origin || !pa.Started.Equal(pb.Started) || !pa.Deadline.Equal(pb.Deadline) || pa.Delivered != pb.Delivered {
			return false
		}
	}
	return a.SN == b.SN && a.IMEI == b.IMEI && a.IMSI == b.IMSI && a.MSISDN == b.MSISDN && a.Alg == b.Alg &&
		a.Status == b.Status && a.RequireEncryption == b.RequireEncryption && equalCreds(a.Creds, b.Creds) &&
		a.LastCommitted == b.LastCommitted && a.Created.Equal(b.Created) && a.Updated.Equal(b.Updated) && a.Version == b.Version
}

func equalCreds(a, b keysvc.Credentials) bool {
	return bytes.Equal(a.Up, b.Up) && bytes.Equal(a.Down, b.Down) && bytes.Equal(a.BK, b.BK) &&
		a.UpExp == b.UpExp && a.DownExp == b.DownExp && a.BKExp == b.BKExp
}

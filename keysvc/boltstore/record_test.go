package boltstore

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

func sampleTerminal(pending bool) *keysvc.Terminal {
	now := time.Unix(1700000000, 0).UTC()
	t := &keysvc.Terminal{
		SN: "SN0001", IMEI: "356938035643809", IMSI: "460001234567890", MSISDN: "8613800000000",
		Alg: codec.HS256, Status: keysvc.StatusActive, RequireEncryption: true,
		Creds: keysvc.Credentials{
			Up: []byte("UpPassw0rdUpPass"), UpExp: codec.Never,
			Down: []byte("DownPassw0rdDown"), DownExp: 1800000000,
			BK: bytes.Repeat([]byte{7}, codec.BasicKeySize), BKExp: codec.Never,
		},
		LastCommitted: 0x0123456789abcdef,
		Created:       now, Updated: now.Add(time.Hour),
	}
	if pending {
		n := t.Creds.Clone()
		n.Up = []byte("NewUpPassword123")
		t.Pending = &keysvc.Change{
			RID: 0xfedcba9876543210, What: codec.WhatPwd, Mode: codec.ModeSMS, Origin: keysvc.OriginOperator,
			New: n, Started: now, Deadline: now.Add(24 * time.Hour), Delivered: true,
		}
	}
	return t
}

func TestRecordRoundTrip(t *testing.T) {
	md5 := sampleTerminal(false)
	md5.Alg, md5.Status, md5.MSISDN, md5.RequireEncryption = codec.MD5, keysvc.StatusDisabled, "", false
	undelivered := sampleTerminal(true)
	undelivered.Pending.Delivered = false
	for _, tc := range []struct {
		name string
		t    *keysvc.Terminal
	}{
		{"plain", sampleTerminal(false)},
		{"pending", sampleTerminal(true)},
		{"md5 disabled", md5},
		{"undelivered", undelivered},
		{"zero times", &keysvc.Terminal{SN: "a", Alg: codec.HS256, Status: keysvc.StatusActive}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := encodeTerminal(nil, tc.t)
			got, err := decodeTerminal(b)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !reflect.DeepEqual(got, tc.t) {
				t.Error("round trip changed the record") // no values: they hold secrets
			}
		})
	}
}

func TestRecordCorrupt(t *testing.T) {
	good := encodeTerminal(nil, sampleTerminal(true))
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"format", append([]byte{9}, good[1:]...)},
		{"truncated", good[:len(good)-1]},
		{"trailing", append(append([]byte(nil), good...), 0)},
		{"long length", []byte{recordFormat, 0xff, 0xff, 0xff, 0xff, 0x0f}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := decodeTerminal(tc.b); !errors.Is(err, keysvc.ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
		})
	}
}

// FuzzDecodeTerminal: decoding never panics, and whatever decodes
// re-encodes to the same bytes (one spelling per record).
func FuzzDecodeTerminal(f *testing.F) {
	f.Add(encodeTerminal(nil, sampleTerminal(false)))
	f.Add(encodeTerminal(nil, sampleTerminal(true)))
	f.Add([]byte{recordFormat})
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, err := decodeTerminal(b)
		if err != nil {
			return
		}
		if again := encodeTerminal(nil, rec); !bytes.Equal(again, b) {
			t.Fatal("decoded record re-encodes differently")
		}
	})
}

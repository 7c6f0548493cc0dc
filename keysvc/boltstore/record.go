package boltstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// The plaintext of a terminal record is a compact binary encoding: it
// decodes about 8x faster than encoding/json (BenchmarkDecodeBinary 1.5 µs
// vs BenchmarkDecodeJSON 12 µs on the 2-core dev box), and JSON alone
// would have exceeded the 10x-a-login budget of an uncached lookup:
//
//	format byte (1)
//	sn imei imsi msisdn  str (uvarint length, bytes)
//	alg byte, status str, flags byte (1 require encryption, 2 pending, 4 delivered)
//	creds: up str, upexp u32, down str, downexp u32, bk str, bkexp u32
//	last_committed u64, created i64, updated i64 (unix seconds)
//	if pending: rid u64, what str, mode str, origin str, creds, started i64, deadline i64
//
// Integers are big-endian fixed width. Nothing may follow the last field.
const recordFormat = 1

const (
	flagRequireEncryption = 1 << iota
	flagPending
	flagDelivered
)

// maxStr bounds every string field of a record.
const maxStr = 256

var errRecord = errors.New("corrupt record")

func appendStr(b []byte, s []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendCreds(b []byte, c *keysvc.Credentials) []byte {
	b = appendStr(b, c.Up)
	b = binary.BigEndian.AppendUint32(b, c.UpExp)
	b = appendStr(b, c.Down)
	b = binary.BigEndian.AppendUint32(b, c.DownExp)
	b = appendStr(b, c.BK)
	return binary.BigEndian.AppendUint32(b, c.BKExp)
}

func appendTime(b []byte, t time.Time) []byte {
	var u int64
	if !t.IsZero() {
		u = t.Unix()
	}
	return binary.BigEndian.AppendUint64(b, uint64(u))
}

// encodeTerminal appends the plaintext encoding of t to b.
func encodeTerminal(b []byte, t *keysvc.Terminal) []byte {
	b = append(b, recordFormat)
	b = appendStr(b, []byte(t.SN))
	b = appendStr(b, []byte(t.IMEI))
	b = appendStr(b, []byte(t.IMSI))
	b = appendStr(b, []byte(t.MSISDN))
	b = append(b, byte(t.Alg))
	b = appendStr(b, []byte(t.Status))
	var flags byte
	if t.RequireEncryption {
		flags |= flagRequireEncryption
	}
	if t.Pending != nil {
		flags |= flagPending
		if t.Pending.Delivered {
			flags |= flagDelivered
		}
	}
	b = append(b, flags)
	b = appendCreds(b, &t.Creds)
	b = binary.BigEndian.AppendUint64(b, uint64(t.LastCommitted))
	b = appendTime(b, t.Created)
	b = appendTime(b, t.Updated)
	if p := t.Pending; p != nil {
		b = binary.BigEndian.AppendUint64(b, uint64(p.RID))
		b = appendStr(b, []byte(p.What))
		b = appendStr(b, []byte(p.Mode))
		b = appendStr(b, []byte(p.Origin))
		b = appendCreds(b, &p.New)
		b = appendTime(b, p.Started)
		b = appendTime(b, p.Deadline)
	}
	return b
}

type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(what string) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: field %s", errRecord, what)
	}
	r.b = nil
}

func uvarintLen(n uint64) int {
	var b [binary.MaxVarintLen64]byte
	return binary.PutUvarint(b[:], n)
}

func (r *reader) bytes(what string) []byte {
	n, k := binary.Uvarint(r.b)
	// k must be the minimal length: one spelling per record.
	if k <= 0 || n > maxStr || n > uint64(len(r.b)-k) || k != uvarintLen(n) {
		r.fail(what)
		return nil
	}
	v := r.b[k : k+int(n)]
	r.b = r.b[k+int(n):]
	return v
}

// secret copies a byte field so the record does not pin the decrypted buffer.
func (r *reader) secret(what string) []byte {
	v := r.bytes(what)
	if len(v) == 0 {
		return nil
	}
	return append(make([]byte, 0, len(v)), v...)
}

func (r *reader) str(what string) string { return string(r.bytes(what)) }

func (r *reader) byte1(what string) byte {
	if len(r.b) < 1 {
		r.fail(what)
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *reader) u32(what string) uint32 {
	if len(r.b) < 4 {
		r.fail(what)
		return 0
	}
	v := binary.BigEndian.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

func (r *reader) u64(what string) uint64 {
	if len(r.b) < 8 {
		r.fail(what)
		return 0
	}
	v := binary.BigEndian.Uint64(r.b)
	r.b = r.b[8:]
	return v
}

func (r *reader) time(what string) time.Time {
	u := int64(r.u64(what))
	if u == 0 {
		return time.Time{}
	}
	if u < 0 || u > math.MaxUint32*4 {
		r.fail(what)
		return time.Time{}
	}
	return time.Unix(u, 0).UTC()
}

func (r *reader) creds(prefix string) keysvc.Credentials {
	return keysvc.Credentials{
		Up:      r.secret(prefix + "up"),
		UpExp:   r.u32(prefix + "upexp"),
		Down:    r.secret(prefix + "down"),
		DownExp: r.u32(prefix + "downexp"),
		BK:      r.secret(prefix + "bk"),
		BKExp:   r.u32(prefix + "bkexp"),
	}
}

// decodeTerminal parses the plaintext encoding of a terminal record. It never
// panics: any malformed input gives an error wrapping keysvc.ErrInvalid.
func decodeTerminal(b []byte) (*keysvc.Terminal, error) {
	r := &reader{b: b}
	if r.byte1("format") != recordFormat {
		r.fail("format")
	}
	t := &keysvc.Terminal{
		SN: r.str("sn"), IMEI: r.str("imei"), IMSI: r.str("imsi"), MSISDN: r.str("msisdn"),
	}
	t.Alg = codec.Alg(r.byte1("alg"))
	if t.Alg != codec.MD5 && t.Alg != codec.HS256 {
		r.fail("alg")
	}
	t.Status = keysvc.Status(r.str("status"))
	if t.Status != keysvc.StatusActive && t.Status != keysvc.StatusDisabled {
		r.fail("status")
	}
	flags := r.byte1("flags")
	if flags&^(flagRequireEncryption|flagPending|flagDelivered) != 0 ||
		flags&(flagPending|flagDelivered) == flagDelivered {
		r.fail("flags")
	}
	t.RequireEncryption = flags&flagRequireEncryption != 0
	t.Creds = r.creds("")
	t.LastCommitted = codec.ID(r.u64("last_committed"))
	t.Created = r.time("created")
	t.Updated = r.time("updated")
	if flags&flagPending != 0 {
		p := &keysvc.Change{RID: codec.ID(r.u64("rid"))}
		p.What = codec.What(r.str("what"))
		if p.What != codec.WhatPwd && p.What != codec.WhatBK && p.What != codec.WhatAll {
			r.fail("what")
		}
		p.Mode = codec.Mode(r.str("mode"))
		if p.Mode != codec.ModeCipher && p.Mode != codec.ModeSMS {
			r.fail("mode")
		}
		p.Origin = r.str("origin")
		p.New = r.creds("pending_")
		p.Started = r.time("started")
		p.Deadline = r.time("deadline")
		p.Delivered = flags&flagDelivered != 0
		t.Pending = p
	}
	if r.err == nil && len(r.b) != 0 {
		r.fail("trailing bytes")
	}
	if r.err != nil {
		return nil, fmt.Errorf("%w: %w", keysvc.ErrInvalid, r.err)
	}
	return t, nil
}

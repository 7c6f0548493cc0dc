package vaultstore

import (
	"encoding/hex"
	"fmt"
	"strconv"
	"time"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// A terminal entry holds only strings, so that `vault kv get` shows it as
// it is and `vault kv patch` can correct it:
//
//	sn imei imsi msisdn alg status require_encryption
//	up upexp down downexp bk bkexp            (bk: 64 hex digits; exp: unix seconds, 4294967295 = never)
//	created updated last_committed            (RFC 3339; rid as 16 hex digits or "")
//	pending_rid pending_what pending_mode pending_origin pending_started pending_deadline pending_delivered
//	pending_up pending_upexp pending_down pending_downexp pending_bk pending_bkexp
//
// The pending_* fields are present only while a change is pending.

// maxField bounds every field before it is parsed.
const maxField = 256

func encodeTerminal(t *keysvc.Terminal) map[string]any {
	m := map[string]any{
		"sn":                 t.SN,
		"imei":               t.IMEI,
		"imsi":               t.IMSI,
		"msisdn":             t.MSISDN,
		"alg":                t.Alg.String(),
		"status":             string(t.Status),
		"require_encryption": strconv.FormatBool(t.RequireEncryption),
		"created":            formatTime(t.Created),
		"updated":            formatTime(t.Updated),
		"last_committed":     formatRID(t.LastCommitted),
	}
	putCreds(m, "", t.Creds)
	if p := t.Pending; p != nil {
		m["pending_rid"] = p.RID.String()
		m["pending_what"] = string(p.What)
		m["pending_mode"] = string(p.Mode)
		m["pending_origin"] = p.Origin
		m["pending_started"] = formatTime(p.Started)
		m["pending_deadline"] = formatTime(p.Deadline)
		m["pending_delivered"] = strconv.FormatBool(p.Delivered)
		putCreds(m, "pending_", p.New)
	}
	return m
}

func putCreds(m map[string]any, prefix string, c keysvc.Credentials) {
	m[prefix+"up"] = string(c.Up)
	m[prefix+"upexp"] = strconv.FormatUint(uint64(c.UpExp), 10)
	m[prefix+"down"] = string(c.Down)
	m[prefix+"downexp"] = strconv.FormatUint(uint64(c.DownExp), 10)
	m[prefix+"bk"] = hex.EncodeToString(c.BK)
	m[prefix+"bkexp"] = strconv.FormatUint(uint64(c.BKExp), 10)
}

func formatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

func formatRID(id codec.ID) string {
	if id == 0 {
		return ""
	}
	return id.String()
}

// decoder reads the fields of an entry and keeps the first error; the
// error names the field, never its value.
type decoder struct {
	m   map[string]any
	err error
}

func (d *decoder) fail(field, reason string) {
	if d.err == nil {
		d.err = fmt.Errorf("field %q: %s: %w", field, reason, keysvc.ErrInvalid)
	}
}

func (d *decoder) str(field string) string {
	v, ok := d.m[field]
	if !ok {
		d.fail(field, "missing")
		return ""
	}
	s, ok := v.(string)
	if !ok {
		d.fail(field, "not a string")
		return ""
	}
	if len(s) > maxField {
		d.fail(field, "too long")
		return ""
	}
	return s
}

// maxList bounds a list field (an application's topic filters).
const maxList = 64

func (d *decoder) list(field string) []string {
	v, ok := d.m[field]
	if !ok || v == nil {
		return nil
	}
	items, ok := v.([]any)
	if !ok || len(items) > maxList {
		d.fail(field, "want a list of at most 64 strings")
		return nil
	}
	out := make([]string, 0, len(items))
	for _, it := range items {
		s, ok := it.(string)
		if !ok || len(s) > maxField {
			d.fail(field, "want a list of strings of at most 256 bytes")
			return nil
		}
		out = append(out, s)
	}
	return out
}

func (d *decoder) has(field string) bool { _, ok := d.m[field]; return ok }

func (d *decoder) uint32(field string) uint32 {
	s := d.str(field)
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		d.fail(field, "want a decimal uint32")
	}
	return uint32(v)
}

func (d *decoder) bool(field string) bool {
	s := d.str(field)
	v, err := strconv.ParseBool(s)
	if err != nil {
		d.fail(field, `want "true" or "false"`)
	}
	return v
}

func (d *decoder) time(field string) time.Time {
	s := d.str(field)
	if s == "" {
		return time.Time{}
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		d.fail(field, "want RFC 3339 time")
	}
	return t.UTC()
}

func (d *decoder) rid(field string, optional bool) codec.ID {
	s := d.str(field)
	if s == "" && optional {
		return 0
	}
	id, err := codec.ParseID(s)
	if err != nil {
		d.fail(field, "want 16 lower-case hex digits")
	}
	return id
}

func (d *decoder) password(field string) []byte {
	p := []byte(d.str(field))
	if err := codec.ValidatePassword(field, p); err != nil {
		d.fail(field, "want 8 to 64 printable characters without '.', ';', '='")
	}
	return p
}

func (d *decoder) key(field string) []byte {
	s := d.str(field)
	k, err := hex.DecodeString(s)
	if err != nil || len(k) != codec.BasicKeySize {
		d.fail(field, "want 64 hex digits")
	}
	return k
}

func (d *decoder) creds(prefix string) keysvc.Credentials {
	return keysvc.Credentials{
		Up: d.password(prefix + "up"), UpExp: d.uint32(prefix + "upexp"),
		Down: d.password(prefix + "down"), DownExp: d.uint32(prefix + "downexp"),
		BK: d.key(prefix + "bk"), BKExp: d.uint32(prefix + "bkexp"),
	}
}

// decodeTerminal parses an entry. version is the KV v2 version it was read at.
func decodeTerminal(m map[string]any, version int) (*keysvc.Terminal, error) {
	d := &decoder{m: m}
	t := &keysvc.Terminal{
		SN: d.str("sn"), IMEI: d.str("imei"), IMSI: d.str("imsi"), MSISDN: d.str("msisdn"),
		Status:            keysvc.Status(d.str("status")),
		RequireEncryption: d.bool("require_encryption"),
		Creds:             d.creds(""),
		Created:           d.time("created"),
		Updated:           d.time("updated"),
		LastCommitted:     d.rid("last_committed", true),
		Version:           uint64(version),
	}
	alg, err := codec.ParseAlg(d.str("alg"))
	if err != nil {
		d.fail("alg", `want "md5" or "hs256"`)
	}
	t.Alg = alg
	if err := (codec.Identity{SN: t.SN, IMEI: t.IMEI, IMSI: t.IMSI}).Validate(); err != nil {
		d.fail("sn/imei/imsi", "not a valid identity")
	}
	if t.Status != keysvc.StatusActive && t.Status != keysvc.StatusDisabled {
		d.fail("status", `want "active" or "disabled"`)
	}
	if d.has("pending_rid") {
		p := &keysvc.Change{
			RID:       d.rid("pending_rid", false),
			What:      codec.What(d.str("pending_what")),
			Mode:      codec.Mode(d.str("pending_mode")),
			Origin:    d.str("pending_origin"),
			Started:   d.time("pending_started"),
			Deadline:  d.time("pending_deadline"),
			Delivered: d.bool("pending_delivered"),
			New:       d.creds("pending_"),
		}
		switch p.What {
		case codec.WhatPwd, codec.WhatBK, codec.WhatAll:
		default:
			d.fail("pending_what", `want "pwd", "bk" or "all"`)
		}
		if p.Mode != codec.ModeCipher && p.Mode != codec.ModeSMS {
			d.fail("pending_mode", `want "cipher" or "sms"`)
		}
		t.Pending = p
	}
	if d.err != nil {
		return nil, d.err
	}
	return t, nil
}

func encodeApp(a *keysvc.App) map[string]any {
	return map[string]any{
		"name":          a.Name,
		"password_hash": a.PasswordHash,
		"subscribe":     a.Subscribe,
		"publish":       a.Publish,
		"created":       formatTime(a.Created),
	}
}

func decodeApp(m map[string]any) (*keysvc.App, error) {
	d := &decoder{m: m}
	a := &keysvc.App{
		Name:         d.str("name"),
		PasswordHash: d.str("password_hash"),
		Subscribe:    d.list("subscribe"),
		Publish:      d.list("publish"),
		Created:      d.time("created"),
	}
	if d.err != nil {
		return nil, d.err
	}
	return a, nil
}

package codec

import (
	"bytes"
	"strconv"
)

// Params are the new credentials of a change (SPEC section 7): the access
// passwords with their expiries, the basic key with its expiry, or all of
// them, as What says. Encoded as ';'-joined key=value in the fixed order
// up, upexp, down, downexp, bk, bkexp.
type Params struct {
	What    What
	Up      []byte // new uplink password   (pwd, all)
	UpExp   uint32
	Down    []byte // new downlink password (pwd, all)
	DownExp uint32
	BK      []byte // new basic key, 32 bytes (bk, all)
	BKExp   uint32
}

var (
	pwdKeys = []string{"up", "upexp", "down", "downexp"}
	bkKeys  = []string{"bk", "bkexp"}
	allKeys = append(append([]string{}, pwdKeys...), bkKeys...)
)

// ParseParams parses the params text. The secrets it returns are copies;
// the caller may clear text afterwards.
func ParseParams(text []byte) (Params, error) {
	if len(text) > MaxControlLen {
		return Params{}, tooLong("params", MaxControlLen)
	}
	var p Params
	keys := pwdKeys
	switch {
	case bytes.HasPrefix(text, []byte("bk=")):
		p.What, keys = WhatBK, bkKeys
	case bytes.Count(text, []byte(";")) == len(allKeys)-1:
		p.What, keys = WhatAll, allKeys
	default:
		p.What = WhatPwd
	}
	rest := text
	for i, key := range keys {
		var item []byte
		var more bool
		item, rest, more = bytes.Cut(rest, []byte(";"))
		if more != (i < len(keys)-1) {
			return Params{}, malformed("params", "want the keys up;upexp;down;downexp, bk;bkexp or all six in that order")
		}
		k, v, ok := bytes.Cut(item, []byte("="))
		if !ok || string(k) != key {
			return Params{}, malformed("params", "want the keys up;upexp;down;downexp, bk;bkexp or all six in that order")
		}
		field := "params." + key
		var err error
		switch key {
		case "up", "down":
			if err = ValidatePassword(field, v); err == nil {
				if key == "up" {
					p.Up = bytes.Clone(v)
				} else {
					p.Down = bytes.Clone(v)
				}
			}
		case "bk":
			p.BK, err = decodeKey(field, v)
		case "upexp":
			p.UpExp, err = parseUint32(field, string(v))
		case "downexp":
			p.DownExp, err = parseUint32(field, string(v))
		case "bkexp":
			p.BKExp, err = parseUint32(field, string(v))
		}
		if err != nil {
			return Params{}, err
		}
	}
	return p, nil
}

func decodeKey(field string, v []byte) ([]byte, error) {
	k, ok := decodeB64(v)
	if !ok || len(k) != BasicKeySize {
		return nil, malformed(field, "want 32 bytes as unpadded base64url")
	}
	return k, nil
}

// AppendTo appends the params text to dst. It fails if a value is missing
// or malformed for What.
func (p *Params) AppendTo(dst []byte) ([]byte, error) {
	if !p.What.valid() {
		return nil, malformed("params.what", `want "pwd", "bk" or "all"`)
	}
	if p.What.Passwords() {
		if err := ValidatePassword("params.up", p.Up); err != nil {
			return nil, err
		}
		if err := ValidatePassword("params.down", p.Down); err != nil {
			return nil, err
		}
		dst = append(append(dst, "up="...), p.Up...)
		dst = strconv.AppendUint(append(dst, ";upexp="...), uint64(p.UpExp), 10)
		dst = append(append(dst, ";down="...), p.Down...)
		dst = strconv.AppendUint(append(dst, ";downexp="...), uint64(p.DownExp), 10)
	}
	if p.What.BasicKey() {
		if len(p.BK) != BasicKeySize {
			return nil, malformed("params.bk", "want 32 bytes")
		}
		if p.What == WhatAll {
			dst = append(dst, ';')
		}
		dst = b64.AppendEncode(append(dst, "bk="...), p.BK)
		dst = strconv.AppendUint(append(dst, ";bkexp="...), uint64(p.BKExp), 10)
	}
	return dst, nil
}

// SMS is the plaintext SMS of a change: M2M1.cfg.<sn>.<rid>.<params>.
// It carries no digest (the SMS bearer is trusted, as in WMMP): a terminal
// accepts it only from the platform's number and only while it waits for
// that rid.
type SMS struct {
	SN     string
	RID    ID
	Params Params
}

// ParseSMS parses the text of a change SMS.
func ParseSMS(text []byte) (SMS, error) {
	if len(text) > MaxControlLen {
		return SMS{}, tooLong("sms", MaxControlLen)
	}
	var f [5][]byte
	rest := text
	for i := range f {
		var ok bool
		f[i], rest, ok = bytes.Cut(rest, []byte("."))
		if ok != (i < len(f)-1) {
			return SMS{}, malformed("sms", "want M2M1.cfg.<sn>.<rid>.<params>")
		}
	}
	if string(f[0]) != Version || string(f[1]) != string(KindCfg) {
		return SMS{}, malformed("sms", "want M2M1.cfg.<sn>.<rid>.<params>")
	}
	m := SMS{SN: string(f[2])}
	if err := ValidateSN(m.SN); err != nil {
		return SMS{}, err
	}
	var err error
	if m.RID, err = parseID("rid", string(f[3])); err != nil {
		return SMS{}, err
	}
	if m.Params, err = ParseParams(f[4]); err != nil {
		return SMS{}, err
	}
	return m, nil
}

// Encode returns the SMS text.
func (m *SMS) Encode() ([]byte, error) {
	if err := ValidateSN(m.SN); err != nil {
		return nil, err
	}
	dst := append([]byte("M2M1.cfg."+m.SN+"."), m.RID.String()...)
	return m.Params.AppendTo(append(dst, '.'))
}

package codec

import (
	"crypto/sha256"
	"strconv"
)

// Kind is the type of a control message, its second field.
type Kind string

// The control messages of SPEC sections 5 and 7.
const (
	KindSK   Kind = "sk"   // platform: session key
	KindErr  Kind = "err"  // platform: error
	KindCfg  Kind = "cfg"  // platform: new credentials, wrapped under bk
	KindAcc  Kind = "acc"  // platform: change accepted, wait for the SMS
	KindDone Kind = "done" // platform: change committed
	KindChg  Kind = "chg"  // terminal: change request
	KindAck  Kind = "ack"  // terminal: change applied
)

// Uplink reports whether messages of this kind go from terminal to
// platform (on $m2m/<sn>/ctl, digested with the uplink password).
func (k Kind) Uplink() bool { return k == KindChg || k == KindAck }

// Topic returns the topic a message of this kind travels on.
func (k Kind) Topic(sn string) string {
	if k.Uplink() {
		return CtlTopic(sn)
	}
	return KeyTopic(sn)
}

// fieldsOf is the number of '.'-separated fields of each kind.
var fieldsOf = map[Kind]int{KindSK: 8, KindErr: 6, KindCfg: 7, KindAcc: 7, KindDone: 6, KindChg: 8, KindAck: 8}

// What names the credentials a change replaces.
type What string

// The credentials a change can replace.
const (
	WhatPwd What = "pwd" // both access passwords
	WhatBK  What = "bk"  // the basic key
	WhatAll What = "all" // both
)

// Passwords reports whether the change replaces the access passwords.
func (w What) Passwords() bool { return w == WhatPwd || w == WhatAll }

// BasicKey reports whether the change replaces the basic key.
func (w What) BasicKey() bool { return w == WhatBK || w == WhatAll }

func (w What) valid() bool { return w == WhatPwd || w == WhatBK || w == WhatAll }

// Mode is how new credentials travel: in ciphertext on the data channel or
// in plaintext by SMS.
type Mode string

// The delivery modes.
const (
	ModeCipher Mode = "cipher"
	ModeSMS    Mode = "sms"
)

func (m Mode) valid() bool { return m == ModeCipher || m == ModeSMS }

// ErrCode is the code of an err message.
type ErrCode string

// The error codes of SPEC section 7.
const (
	CodeBadRequest ErrCode = "bad-request"
	CodeReplay     ErrCode = "replay"
	CodeSkew       ErrCode = "skew"
	CodeBusy       ErrCode = "busy"
	CodeNoChannel  ErrCode = "no-channel"
	CodeBKMismatch ErrCode = "bk-mismatch"
	CodeBKExpired  ErrCode = "bk-expired"
	CodeUnknownRID ErrCode = "unknown-rid"
)

func (c ErrCode) valid() bool {
	switch c {
	case CodeBadRequest, CodeReplay, CodeSkew, CodeBusy, CodeNoChannel, CodeBKMismatch, CodeBKExpired, CodeUnknownRID:
		return true
	}
	return false
}

// Control is one control message. Which fields are meaningful depends on
// Kind; the others stay zero:
//
//	sk    M2M1.sk.<alg>.<T>.<exp>.<sid>.<wrapped>.<digest>
//	err   M2M1.err.<alg>.<T>.<code>.<digest>
//	cfg   M2M1.cfg.<alg>.<T>.<rid>.<wrapped>.<digest>
//	acc   M2M1.acc.<alg>.<T>.<rid>.sms.<digest>
//	done  M2M1.done.<alg>.<T>.<rid>.<digest>
//	chg   M2M1.chg.<alg>.<what>.<mode>.<ts>.<nonce>.<digest>
//	ack   M2M1.ack.<alg>.<rid>.<ts>.<nonce>.<bkd>.<digest>
//
// TS holds T for platform messages and ts for terminal ones: it is the time
// the digest covers.
type Control struct {
	Kind    Kind
	Alg     Alg
	TS      uint32
	Exp     uint32  // sk: when the platform ends the session
	SID     ID      // sk
	RID     ID      // cfg, acc, done, ack
	Nonce   ID      // chg, ack
	What    What    // chg
	Mode    Mode    // chg; acc (always ModeSMS)
	Code    ErrCode // err
	Wrapped string  // sk, cfg: see Wrap
	BKD     string  // ack: bkd of the new basic key, or "" if bk did not change
	Digest  string  // lower-case hex; set by Sign
}

// ParseControl parses a control payload of any kind. It checks the form of
// every field but verifies nothing; call Verify for that.
func ParseControl(payload []byte) (Control, error) {
	if len(payload) > MaxControlLen {
		return Control{}, tooLong("payload", MaxControlLen)
	}
	s := string(payload)
	var f [8]string
	n := fieldCount(s)
	if n < 6 || n > len(f) {
		return Control{}, malformed("payload", "wrong number of fields")
	}
	split(s, f[:n])
	if f[0] != Version {
		return Control{}, malformed("version", `want "M2M1"`)
	}
	c := Control{Kind: Kind(f[1])}
	want, ok := fieldsOf[c.Kind]
	if !ok {
		return Control{}, malformed("type", "unknown message type")
	}
	if n != want {
		return Control{}, malformed("payload", "wrong number of fields for "+string(c.Kind))
	}
	var err error
	if c.Alg, err = ParseAlg(f[2]); err != nil {
		return Control{}, err
	}
	p := &fieldParser{f: f[3:n]}
	switch c.Kind {
	case KindSK:
		c.TS = p.uint32("T")
		c.Exp = p.uint32("exp")
		c.SID = p.id("sid")
		c.Wrapped = p.wrapped("wrapped")
	case KindErr:
		c.TS = p.uint32("T")
		c.Code = ErrCode(p.next())
		if !c.Code.valid() {
			p.fail(malformed("code", "unknown error code"))
		}
	case KindCfg:
		c.TS = p.uint32("T")
		c.RID = p.id("rid")
		c.Wrapped = p.wrapped("wrapped")
	case KindAcc:
		c.TS = p.uint32("T")
		c.RID = p.id("rid")
		if p.next() != string(ModeSMS) {
			p.fail(malformed("mode", `want "sms"`))
		}
		c.Mode = ModeSMS
	case KindDone:
		c.TS = p.uint32("T")
		c.RID = p.id("rid")
	case KindChg:
		c.What = What(p.next())
		if !c.What.valid() {
			p.fail(malformed("what", `want "pwd", "bk" or "all"`))
		}
		c.Mode = Mode(p.next())
		if !c.Mode.valid() {
			p.fail(malformed("mode", `want "cipher" or "sms"`))
		}
		c.TS = p.uint32("ts")
		c.Nonce = p.id("nonce")
	case KindAck:
		c.RID = p.id("rid")
		c.TS = p.uint32("ts")
		c.Nonce = p.id("nonce")
		c.BKD = p.next()
		if c.BKD != "" && !validBKD(c.BKD) {
			p.fail(malformed("bkd", "want 32 lower-case hex digits or empty"))
		}
	}
	c.Digest = p.next()
	if p.err != nil {
		return Control{}, p.err
	}
	if err := checkDigestField(c.Alg, c.Digest); err != nil {
		return Control{}, err
	}
	return c, nil
}

// fieldParser walks the fields of a token and keeps the first error.
type fieldParser struct {
	f   []string
	err error
}

func (p *fieldParser) next() string {
	s := p.f[0]
	p.f = p.f[1:]
	return s
}

func (p *fieldParser) fail(err error) {
	if p.err == nil {
		p.err = err
	}
}

func (p *fieldParser) uint32(name string) uint32 {
	v, err := parseUint32(name, p.next())
	p.fail(err)
	return v
}

func (p *fieldParser) id(name string) ID {
	v, err := parseID(name, p.next())
	p.fail(err)
	return v
}

func (p *fieldParser) wrapped(name string) string {
	s := p.next()
	if !validWrapped(s) {
		p.fail(malformed(name, "want unpadded base64url of nonce, ciphertext and tag"))
	}
	return s
}

// validate checks every field that Encode writes.
func (c *Control) validate() error {
	if _, ok := fieldsOf[c.Kind]; !ok {
		return malformed("type", "unknown message type")
	}
	if !c.Alg.valid() {
		return malformed("alg", `want "md5" or "hs256"`)
	}
	switch c.Kind {
	case KindSK, KindCfg:
		if !validWrapped(c.Wrapped) {
			return malformed("wrapped", "want unpadded base64url of nonce, ciphertext and tag")
		}
	case KindErr:
		if !c.Code.valid() {
			return malformed("code", "unknown error code")
		}
	case KindChg:
		if !c.What.valid() {
			return malformed("what", `want "pwd", "bk" or "all"`)
		}
		if !c.Mode.valid() {
			return malformed("mode", `want "cipher" or "sms"`)
		}
	case KindAck:
		if c.BKD != "" && !validBKD(c.BKD) {
			return malformed("bkd", "want 32 lower-case hex digits or empty")
		}
	}
	return nil
}

// appendPrefix appends the token up to and including the '.' before the
// digest.
func (c *Control) appendPrefix(dst []byte) []byte {
	dst = append(dst, Version...)
	dst = append(dst, '.')
	dst = append(dst, c.Kind...)
	dst = append(dst, '.')
	dst = append(dst, c.Alg.String()...)
	dst = append(dst, '.')
	num := func(v uint32) { dst = append(strconv.AppendUint(dst, uint64(v), 10), '.') }
	id := func(v ID) { dst = append(v.appendTo(dst), '.') }
	str := func(s string) { dst = append(append(dst, s...), '.') }
	switch c.Kind {
	case KindSK:
		num(c.TS)
		num(c.Exp)
		id(c.SID)
		str(c.Wrapped)
	case KindErr:
		num(c.TS)
		str(string(c.Code))
	case KindCfg:
		num(c.TS)
		id(c.RID)
		str(c.Wrapped)
	case KindAcc:
		num(c.TS)
		id(c.RID)
		str(string(ModeSMS))
	case KindDone:
		num(c.TS)
		id(c.RID)
	case KindChg:
		str(string(c.What))
		str(string(c.Mode))
		num(c.TS)
		id(c.Nonce)
	case KindAck:
		id(c.RID)
		num(c.TS)
		id(c.Nonce)
		str(c.BKD)
	}
	return dst
}

// Encode returns the payload with the current Digest.
func (c *Control) Encode() []byte {
	return append(c.appendPrefix(make([]byte, 0, 128+len(c.Wrapped))), c.Digest...)
}

// Sign computes the digest D(alg, pwd, S(sn, topic, prefix), TS) for the
// terminal id, stores it in c.Digest and returns the payload. pwd is the
// downlink password for platform messages and the uplink password for
// terminal messages (for ack and done: the new one if the change replaces
// it). The topic is the one Kind travels on.
func (c *Control) Sign(id Identity, pwd []byte) ([]byte, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	if c.Kind == KindAcc {
		c.Mode = ModeSMS // acc always announces the SMS mode
	}
	prefix := c.appendPrefix(make([]byte, 0, 128+len(c.Wrapped)+2*sha256.Size))
	var hexBuf [2 * sha256.Size]byte
	digest := appendDigest(hexBuf[:0], c.Alg, pwd, id, id.SN, c.Kind.Topic(id.SN), prefix, c.TS)
	c.Digest = string(digest)
	return append(prefix, digest...), nil
}

// Verify reports, in constant time, whether the digest verifies for the
// terminal id with password pwd.
func (c *Control) Verify(id Identity, pwd []byte) bool {
	var buf [MaxControlLen]byte
	prefix := c.appendPrefix(buf[:0])
	return digestEqual(c.Digest, c.Alg, pwd, id, id.SN, c.Kind.Topic(id.SN), prefix, c.TS)
}

// validWrapped reports whether s is canonical unpadded base64url of at
// least a GCM nonce and tag.
func validWrapped(s string) bool {
	if len(s) > MaxControlLen {
		return false
	}
	n, ok := checkB64(s)
	return ok && n >= gcmNonceSize+gcmTagSize
}

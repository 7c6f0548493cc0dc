package codec

import (
	"strconv"
)

// FlagSessionKey is login flag 01: the terminal asks for a session key and
// sends the bkd of its basic key.
const FlagSessionKey uint8 = 0x01

// Login is a terminal's MQTT CONNECT credentials (SPEC section 3):
//
//	ClientID  sn
//	Username  IMEI ":" IMSI
//	Password  M2M1.<alg>.<flags>.<ts>.<nonce>.<bkd>.<digest>
type Login struct {
	Identity
	Alg    Alg
	Flags  uint8  // 0 or FlagSessionKey
	TS     uint32 // the terminal's clock, unix seconds
	Nonce  ID     // fresh for every connection attempt
	BKD    string // bkd of the basic key if Flags has FlagSessionKey, else ""
	Digest string // lower-case hex; set by Sign
}

// ParseLogin parses the three CONNECT fields. It checks the form of every
// field (SPEC section 3, step 1) but verifies nothing; call Verify with the
// terminal's uplink password for that.
func ParseLogin(clientID, username string, password []byte) (Login, error) {
	if len(password) > MaxPasswordLen {
		return Login{}, tooLong("password", MaxPasswordLen)
	}
	var l Login
	if err := ValidateSN(clientID); err != nil {
		return Login{}, err
	}
	imei, imsi, err := ParseUsername(username)
	if err != nil {
		return Login{}, err
	}
	l.Identity = Identity{SN: clientID, IMEI: imei, IMSI: imsi}

	var f [7]string
	if !split(string(password), f[:]) {
		return Login{}, malformed("password", "want 7 fields M2M1.alg.flags.ts.nonce.bkd.digest")
	}
	if f[0] != Version {
		return Login{}, malformed("version", `want "M2M1"`)
	}
	if l.Alg, err = ParseAlg(f[1]); err != nil {
		return Login{}, err
	}
	switch f[2] {
	case "00":
		l.Flags = 0
	case "01":
		l.Flags = FlagSessionKey
	default:
		return Login{}, malformed("flags", `want "00" or "01"`)
	}
	if l.TS, err = parseUint32("ts", f[3]); err != nil {
		return Login{}, err
	}
	if l.Nonce, err = parseID("nonce", f[4]); err != nil {
		return Login{}, err
	}
	l.BKD = f[5]
	if l.Flags&FlagSessionKey != 0 {
		if !validBKD(l.BKD) {
			return Login{}, malformed("bkd", "want 32 lower-case hex digits with flag 01")
		}
	} else if l.BKD != "" {
		return Login{}, malformed("bkd", "want empty without flag 01")
	}
	if err := checkDigestField(l.Alg, f[6]); err != nil {
		return Login{}, err
	}
	l.Digest = f[6]
	return l, nil
}

// ClientID returns the CONNECT ClientID, the serial number.
func (l *Login) ClientID() string { return l.SN }

// WantsSessionKey reports whether the login carries flag 01.
func (l *Login) WantsSessionKey() bool { return l.Flags&FlagSessionKey != 0 }

// appendPrefix appends the password token up to and including the '.'
// before the digest.
func (l *Login) appendPrefix(dst []byte) []byte {
	dst = append(dst, Version...)
	dst = append(dst, '.')
	dst = append(dst, l.Alg.String()...)
	dst = append(dst, '.', '0', '0'+l.Flags, '.')
	dst = strconv.AppendUint(dst, uint64(l.TS), 10)
	dst = append(dst, '.')
	dst = l.Nonce.appendTo(dst)
	dst = append(dst, '.')
	dst = append(dst, l.BKD...)
	return append(dst, '.')
}

func (l *Login) validate() error {
	if err := l.Identity.Validate(); err != nil {
		return err
	}
	if !l.Alg.valid() {
		return malformed("alg", `want "md5" or "hs256"`)
	}
	switch {
	case l.Flags > FlagSessionKey:
		return malformed("flags", `want "00" or "01"`)
	case l.Flags == FlagSessionKey && !validBKD(l.BKD):
		return malformed("bkd", "want 32 lower-case hex digits with flag 01")
	case l.Flags == 0 && l.BKD != "":
		return malformed("bkd", "want empty without flag 01")
	}
	return nil
}

// Sign computes the digest with the uplink password up, stores it in
// l.Digest and returns the CONNECT password token.
func (l *Login) Sign(up []byte) ([]byte, error) {
	if err := l.validate(); err != nil {
		return nil, err
	}
	var buf [MaxPasswordLen]byte
	prefix := l.appendPrefix(buf[:0])
	l.Digest = string(appendDigest(nil, l.Alg, up, l.Identity, l.SN, l.Username(), prefix, l.TS))
	return l.Password(), nil
}

// Password returns the password token with the current Digest.
func (l *Login) Password() []byte {
	out := l.appendPrefix(make([]byte, 0, 64+len(l.BKD)+len(l.Digest)))
	return append(out, l.Digest...)
}

// Verify reports, in constant time, whether the digest verifies with the
// uplink password up.
func (l *Login) Verify(up []byte) bool {
	var pbuf [MaxPasswordLen]byte
	var ubuf [40]byte
	prefix := l.appendPrefix(pbuf[:0])
	user := append(append(append(ubuf[:0], l.IMEI...), ':'), l.IMSI...)
	return digestEqual(l.Digest, l.Alg, up, l.Identity, l.SN, string(user), prefix, l.TS)
}

func checkDigestField(alg Alg, s string) error {
	if len(s) != alg.digestHexLen() || !isLowerHex(s) {
		if alg == MD5 {
			return malformed("digest", "want 32 lower-case hex digits for md5")
		}
		return malformed("digest", "want 64 lower-case hex digits for hs256")
	}
	return nil
}

package hook_test

// specTerminal is a terminal written from docs/SPEC.md alone, with the standard
// library and none of this repository's code, so that the hook is tested
// against the wire contract rather than against its own codec.

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/md5"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
)

type specTerminal struct {
	sn, imei, imsi string
	alg            string // "md5" or "hs256"
	up, down       string
	bk             []byte
	bkexp          uint32
}

func (t specTerminal) username() string { return t.imei + ":" + t.imsi }

func pad(s string, n int) []byte {
	b := make([]byte, n)
	copy(b, s)
	return b
}

// digest is D(alg, pwd, S(a, b, prefix), ts) of SPEC section 2.
func (t specTerminal) digest(pwd, a, b, prefix string, ts uint32) string {
	msg := []byte(a + "\n" + b + "\n" + prefix)
	msg = binary.BigEndian.AppendUint32(msg, ts)
	msg = append(msg, pad(t.imei, 16)...)
	msg = append(msg, pad(t.imsi, 15)...)
	if t.alg == "md5" {
		sum := md5.Sum(append(msg, pwd...))
		return hex.EncodeToString(sum[:])
	}
	mac := hmac.New(sha256.New, []byte(pwd))
	mac.Write(msg)
	return hex.EncodeToString(mac.Sum(nil))
}

func (t specTerminal) bkd() string {
	msg := binary.BigEndian.AppendUint32(append([]byte{}, t.bk...), t.bkexp)
	if t.alg == "md5" {
		sum := md5.Sum(msg)
		return hex.EncodeToString(sum[:])
	}
	sum := sha256.Sum256(msg)
	return hex.EncodeToString(sum[:16])
}

// password is the CONNECT password of SPEC section 3.
func (t specTerminal) password(wantKey bool, ts uint32, nonce uint64) string {
	flags, bkd := "00", ""
	if wantKey {
		flags, bkd = "01", t.bkd()
	}
	prefix := fmt.Sprintf("M2M1.%s.%s.%d.%016x.%s.", t.alg, flags, ts, nonce, bkd)
	return prefix + t.digest(t.up, t.sn, t.username(), prefix, ts)
}

// verifyDown checks a key-topic message's digest with the downlink password
// and returns its fields.
func (t specTerminal) verifyDown(payload string) ([]string, error) {
	i := strings.LastIndexByte(payload, '.')
	if i < 0 {
		return nil, fmt.Errorf("no digest")
	}
	f := strings.Split(payload, ".")
	if len(f) < 5 || f[0] != "M2M1" || f[2] != t.alg {
		return nil, fmt.Errorf("not an M2M1 %s message", t.alg)
	}
	ts, err := strconv.ParseUint(f[3], 10, 32)
	if err != nil {
		return nil, err
	}
	want := t.digest(t.down, t.sn, "$m2m/"+t.sn+"/key", payload[:i+1], uint32(ts))
	if !hmac.Equal([]byte(want), []byte(payload[i+1:])) {
		return nil, fmt.Errorf("downlink digest does not verify")
	}
	return f, nil
}

// sessionKey verifies an sk message and unwraps the session key.
func (t specTerminal) sessionKey(payload string) (ks []byte, exp uint64, err error) {
	f, err := t.verifyDown(payload)
	if err != nil {
		return nil, 0, err
	}
	if f[1] != "sk" || len(f) != 8 {
		return nil, 0, fmt.Errorf("not an sk message: %s", f[1])
	}
	exp, _ = strconv.ParseUint(f[4], 10, 32)
	raw, err := base64.RawURLEncoding.DecodeString(f[6])
	if err != nil || len(raw) < 28 {
		return nil, 0, fmt.Errorf("bad wrapped key")
	}
	gcm := newGCM(t.bk)
	ks, err = gcm.Open(nil, raw[:12], raw[12:], []byte("M2M1.sk."+t.sn+"."+f[5]))
	return ks, exp, err
}

func newGCM(key []byte) cipher.AEAD {
	block, err := aes.NewCipher(key)
	if err != nil {
		panic(err)
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	return gcm
}

func envNonce(dir string, seq uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(dir), seq)
}

// sealUp builds an uplink envelope of SPEC section 6.
func sealUp(ks []byte, seq uint64, topic string, plain []byte) []byte {
	out := binary.BigEndian.AppendUint64([]byte{0x01}, seq)
	return newGCM(ks).Seal(out, envNonce("UPLK", seq), plain, []byte(topic))
}

// openDown opens a downlink envelope.
func openDown(ks []byte, topic string, env []byte) (uint64, []byte, error) {
	if len(env) < 25 || env[0] != 0x01 {
		return 0, nil, fmt.Errorf("not an envelope")
	}
	seq := binary.BigEndian.Uint64(env[1:9])
	plain, err := newGCM(ks).Open(nil, envNonce("DNLK", seq), env[9:], []byte(topic))
	return seq, plain, err
}

// chg builds a change request (SPEC section 7), digested with up.
func (t specTerminal) chg(what, mode string, ts uint32, nonce uint64) []byte {
	prefix := fmt.Sprintf("M2M1.chg.%s.%s.%s.%d.%016x.", t.alg, what, mode, ts, nonce)
	return []byte(prefix + t.digest(t.up, t.sn, "$m2m/"+t.sn+"/ctl", prefix, ts))
}

// ack confirms change rid with the new values held in next.
func (t specTerminal) ack(next specTerminal, rid string, bkChanged bool, ts uint32, nonce uint64) []byte {
	bkd := ""
	if bkChanged {
		bkd = next.bkd()
	}
	prefix := fmt.Sprintf("M2M1.ack.%s.%s.%d.%016x.%s.", t.alg, rid, ts, nonce, bkd)
	return []byte(prefix + next.digest(next.up, t.sn, "$m2m/"+t.sn+"/ctl", prefix, ts))
}

// applyParams returns the terminal with the new values of a params text.
func (t specTerminal) applyParams(params string) (specTerminal, error) {
	next := t
	for _, kv := range strings.Split(params, ";") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return t, fmt.Errorf("bad params item")
		}
		switch k {
		case "up":
			next.up = v
		case "down":
			next.down = v
		case "bk":
			bk, err := base64.RawURLEncoding.DecodeString(v)
			if err != nil || len(bk) != 32 {
				return t, fmt.Errorf("bad bk")
			}
			next.bk = bk
		case "bkexp":
			n, err := strconv.ParseUint(v, 10, 32)
			if err != nil {
				return t, err
			}
			next.bkexp = uint32(n)
		case "upexp", "downexp":
		default:
			return t, fmt.Errorf("unknown params key %q", k)
		}
	}
	return next, nil
}

// cfg verifies a cfg message and returns its rid and params.
func (t specTerminal) cfg(payload string) (rid, params string, err error) {
	f, err := t.verifyDown(payload)
	if err != nil {
		return "", "", err
	}
	if f[1] != "cfg" || len(f) != 7 {
		return "", "", fmt.Errorf("not a cfg message: %s", f[1])
	}
	raw, err := base64.RawURLEncoding.DecodeString(f[5])
	if err != nil || len(raw) < 28 {
		return "", "", fmt.Errorf("bad wrapped params")
	}
	plain, err := newGCM(t.bk).Open(nil, raw[:12], raw[12:], []byte("M2M1.cfg."+t.sn+"."+f[4]))
	return f[4], string(plain), err
}

// smsText parses the SMS of a change for this terminal.
func (t specTerminal) smsText(text, wantRID string) (string, error) {
	prefix := "M2M1.cfg." + t.sn + "." + wantRID + "."
	if !strings.HasPrefix(text, prefix) {
		return "", fmt.Errorf("not the SMS of change %s", wantRID)
	}
	return text[len(prefix):], nil
}

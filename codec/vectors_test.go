package codec_test

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"testing"

	"github.com/m2mguard/m2mguard/codec"
)

// vectorsFile holds the test vectors of docs/SPEC.md: the canonical copy,
// maintained with the spec.
const vectorsFile = "testdata/vectors.json"

type vterminal struct {
	SN    string `json:"sn"`
	IMEI  string `json:"imei"`
	IMSI  string `json:"imsi"`
	Up    string `json:"up"`
	Down  string `json:"down"`
	BK    string `json:"bk"`
	BKExp uint32 `json:"bkexp"`
}

type vlogin struct {
	ClientID string `json:"client_id"`
	Username string `json:"username"`
	Password string `json:"password"`
}

type vmsg struct {
	Topic   string `json:"topic"`
	Payload string `json:"payload"`
}

type venvelope struct {
	Topic      string `json:"topic"`
	Plaintext  string `json:"plaintext"`
	PayloadHex string `json:"payload_hex"`
}

type valg struct {
	LoginPlain      vlogin `json:"login_plain"`
	BKD             string `json:"bkd"`
	LoginSessionKey vlogin `json:"login_session_key"`
	SessionKey      struct {
		vmsg
		PlainSessionKey string `json:"plain_session_key"`
	} `json:"session_key"`
	UplinkEnvelope   venvelope `json:"uplink_envelope"`
	DownlinkEnvelope venvelope `json:"downlink_envelope"`
	ChangeRequest    vmsg      `json:"change_request"`
	Cfg              struct {
		vmsg
		Params string `json:"params"`
	} `json:"cfg"`
	AccSMS  vmsg   `json:"acc_sms"`
	SMSText string `json:"sms_text"`
	Ack     vmsg   `json:"ack"`
	Done    vmsg   `json:"done"`
}

type vectors struct {
	About    string    `json:"_about"`
	Terminal vterminal `json:"terminal"`
	MD5      valg      `json:"md5"`
	HS256    valg      `json:"hs256"`
}

func readVectors(t testing.TB) []byte {
	t.Helper()
	data, err := os.ReadFile(vectorsFile)
	if err != nil {
		t.Fatalf("read vectors: %v", err)
	}
	return data
}

func decodeVectors(data []byte) (vectors, error) {
	var v vectors
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	err := dec.Decode(&v)
	return v, err
}

func TestVectors(t *testing.T) {
	v, err := decodeVectors(readVectors(t))
	if err != nil {
		t.Fatalf("decode vectors: %v", err)
	}
	for _, alg := range []codec.Alg{codec.MD5, codec.HS256} {
		t.Run(alg.String(), func(t *testing.T) {
			if err := checkAlg(v.Terminal, alg, v.section(alg)); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestVectorsMutated changes every byte of every value in the vectors file,
// one at a time, and requires the check to fail for each: no value in the
// file goes unchecked. The file's sections (terminal, md5, hs256) are
// mutated side by side, each in a copy of the file's tree of its own. A
// value of an algorithm's section is checked by that algorithm's check
// alone, which reads the terminal and that section: a change there is
// checked on the file without the other algorithm's section, which is
// unchanged and passes (the unmodified file does).
func TestVectorsMutated(t *testing.T) {
	t.Parallel()
	raw := readVectors(t)
	tree := vectorTree(t, raw)
	if err := checkTree(tree); err != nil {
		t.Fatalf("unmodified vectors fail: %v", err)
	}
	for section := range tree {
		t.Run(section, func(t *testing.T) {
			t.Parallel()
			tree := vectorTree(t, raw)
			file, algs := tree, []codec.Alg{codec.MD5, codec.HS256} // the terminal: both
			if alg, ok := map[string]codec.Alg{"md5": codec.MD5, "hs256": codec.HS256}[section]; ok {
				file, algs = map[string]any{"terminal": tree["terminal"], section: tree[section]}, []codec.Alg{alg}
			}
			mutations, undetected := 0, 0
			var mutate func(path string, node map[string]any, key string)
			mutate = func(path string, node map[string]any, key string) {
				p := path + "." + key
				val := node[key]
				if x, ok := val.(map[string]any); ok {
					for k := range x {
						mutate(p, x, k)
					}
					return
				}
				// The file with this value changed is prefix, the changed
				// value's JSON, suffix: what json.Marshal makes of the
				// changed tree, byte for byte, at the cost of one Marshal
				// per value instead of one per changed byte.
				prefix, suffix := splitAt(t, file, node, key)
				detected := func(changed any) bool {
					b, err := json.Marshal(changed)
					if err != nil {
						t.Fatal(err)
					}
					mutations++
					if checkData(slices.Concat(prefix, b, suffix), algs...) == nil {
						undetected++
						return false
					}
					return true
				}
				switch x := val.(type) {
				case float64:
					if !detected(x - 1) {
						t.Errorf("%s: changed number went undetected", p)
					}
				case string:
					for i := 0; i < len(x); i++ {
						b := []byte(x)
						b[i] ^= 0x01
						if !detected(string(b)) {
							t.Errorf("%s: byte %d changed went undetected", p, i)
						}
					}
				}
			}
			mutate("", tree, section)
			t.Logf("%d single-byte mutations, %d undetected", mutations, undetected)
		})
	}
}

// vectorTree returns the vectors file raw as a generic tree, without its
// prose.
func vectorTree(t *testing.T, raw []byte) map[string]any {
	t.Helper()
	var tree map[string]any
	if err := json.Unmarshal(raw, &tree); err != nil {
		t.Fatal(err)
	}
	delete(tree, "_about") // prose
	return tree
}

// splitAt returns the JSON of tree before and after the value of key in
// node, a map within tree.
func splitAt(t *testing.T, tree, node map[string]any, key string) (prefix, suffix []byte) {
	t.Helper()
	const site = "mutation site 5d1c0b7e" // in no vectors file
	val := node[key]
	node[key] = site
	data, err := json.Marshal(tree)
	node[key] = val
	if err != nil {
		t.Fatal(err)
	}
	prefix, suffix, ok := bytes.Cut(data, []byte(`"`+site+`"`))
	if !ok || bytes.Contains(suffix, []byte(site)) {
		t.Fatalf("the mutation site is not once in the JSON")
	}
	return prefix, suffix
}

func checkTree(tree map[string]any) error {
	data, err := json.Marshal(tree)
	if err != nil {
		return err
	}
	return checkData(data, codec.MD5, codec.HS256)
}

// checkData checks the sections of algs in the vectors file data.
func checkData(data []byte, algs ...codec.Alg) error {
	v, err := decodeVectors(data)
	if err != nil {
		return err
	}
	for _, alg := range algs {
		if err := checkAlg(v.Terminal, alg, v.section(alg)); err != nil {
			return err
		}
	}
	return nil
}

func (v vectors) section(alg codec.Alg) valg {
	if alg == codec.MD5 {
		return v.MD5
	}
	return v.HS256
}

// checkAlg rebuilds every message of one algorithm's section from its
// inputs (the terminal, and the times, nonces and ids that are fields of
// the messages), requires the same bytes, and parses and verifies each.
func checkAlg(term vterminal, alg codec.Alg, v valg) error {
	id := codec.Identity{SN: term.SN, IMEI: term.IMEI, IMSI: term.IMSI}
	up, down := []byte(term.Up), []byte(term.Down)
	bk, err := hex.DecodeString(term.BK)
	if err != nil || len(bk) != 32 {
		return fmt.Errorf("terminal.bk: not 32 bytes of hex")
	}
	if hex.EncodeToString(bk) != term.BK {
		return fmt.Errorf("terminal.bk: not canonical hex")
	}
	if got := codec.BasicKeyDigest(alg, bk, term.BKExp); got != v.BKD {
		return fmt.Errorf("bkd: got %s want %s", got, v.BKD)
	}

	// Logins.
	for _, c := range []struct {
		name  string
		vec   vlogin
		flags uint8
		bkd   string
	}{{"login_plain", v.LoginPlain, 0, ""}, {"login_session_key", v.LoginSessionKey, codec.FlagSessionKey, v.BKD}} {
		parsed, err := codec.ParseLogin(c.vec.ClientID, c.vec.Username, []byte(c.vec.Password))
		if err != nil {
			return fmt.Errorf("%s: parse: %w", c.name, err)
		}
		if c.vec.ClientID != id.SN || c.vec.Username != id.Username() {
			return fmt.Errorf("%s: client id or username do not match the terminal", c.name)
		}
		if !parsed.Verify(up) {
			return fmt.Errorf("%s: digest does not verify", c.name)
		}
		built := codec.Login{Identity: id, Alg: alg, Flags: c.flags, TS: parsed.TS, Nonce: parsed.Nonce, BKD: c.bkd}
		pw, err := built.Sign(up)
		if err != nil {
			return fmt.Errorf("%s: build: %w", c.name, err)
		}
		if string(pw) != c.vec.Password {
			return fmt.Errorf("%s: built %s want %s", c.name, pw, c.vec.Password)
		}
	}

	// Session key.
	sk, err := parseSigned(v.SessionKey.vmsg, codec.KindSK, alg, id, down)
	if err != nil {
		return fmt.Errorf("session_key: %w", err)
	}
	ks, err := codec.UnwrapSessionKey(bk, id.SN, sk.SID, sk.Wrapped)
	if err != nil {
		return fmt.Errorf("session_key: unwrap: %w", err)
	}
	if hex.EncodeToString(ks) != v.SessionKey.PlainSessionKey {
		return fmt.Errorf("session_key: unwrapped key differs from plain_session_key")
	}
	wrapped, err := codec.WrapSessionKey(bk, id.SN, sk.SID, ks, nonceOf(sk.Wrapped))
	if err != nil {
		return fmt.Errorf("session_key: wrap: %w", err)
	}
	if err := rebuild(v.SessionKey.vmsg, codec.Control{Kind: codec.KindSK, Alg: alg, TS: sk.TS, Exp: sk.Exp, SID: sk.SID, Wrapped: wrapped}, id, down); err != nil {
		return fmt.Errorf("session_key: %w", err)
	}

	// Envelopes.
	aead, err := codec.NewAEAD(ks)
	if err != nil {
		return err
	}
	for _, e := range []struct {
		name string
		vec  venvelope
		dir  codec.Direction
		sub  string
	}{{"uplink_envelope", v.UplinkEnvelope, codec.Uplink, "up"}, {"downlink_envelope", v.DownlinkEnvelope, codec.Downlink, "down"}} {
		kind, sn := codec.ParseTopic(e.vec.Topic)
		if sn != id.SN || (e.dir == codec.Uplink) != (kind == codec.TopicUp) || (e.dir == codec.Downlink) != (kind == codec.TopicDown) {
			return fmt.Errorf("%s: topic is not the terminal's %s topic", e.name, e.sub)
		}
		payload, err := hex.DecodeString(e.vec.PayloadHex)
		if err != nil || hex.EncodeToString(payload) != e.vec.PayloadHex {
			return fmt.Errorf("%s: payload_hex is not canonical hex", e.name)
		}
		seq, plain, err := codec.Open(nil, aead, e.dir, e.vec.Topic, payload)
		if err != nil {
			return fmt.Errorf("%s: open: %w", e.name, err)
		}
		if string(plain) != e.vec.Plaintext {
			return fmt.Errorf("%s: plaintext differs", e.name)
		}
		if built := codec.Seal(nil, aead, e.dir, seq, e.vec.Topic, []byte(e.vec.Plaintext)); !bytes.Equal(built, payload) {
			return fmt.Errorf("%s: sealed %x want %s", e.name, built, e.vec.PayloadHex)
		}
	}

	// Change request.
	chg, err := parseSigned(v.ChangeRequest, codec.KindChg, alg, id, up)
	if err != nil {
		return fmt.Errorf("change_request: %w", err)
	}
	if err := rebuild(v.ChangeRequest, codec.Control{Kind: codec.KindChg, Alg: alg, What: chg.What, Mode: chg.Mode, TS: chg.TS, Nonce: chg.Nonce}, id, up); err != nil {
		return fmt.Errorf("change_request: %w", err)
	}

	// cfg, and the params it wraps.
	cfg, err := parseSigned(v.Cfg.vmsg, codec.KindCfg, alg, id, down)
	if err != nil {
		return fmt.Errorf("cfg: %w", err)
	}
	params, err := codec.UnwrapParams(bk, id.SN, cfg.RID, cfg.Wrapped)
	if err != nil {
		return fmt.Errorf("cfg: unwrap: %w", err)
	}
	text, err := params.AppendTo(nil)
	if err != nil || string(text) != v.Cfg.Params {
		return fmt.Errorf("cfg: unwrapped params differ from cfg.params (%v)", err)
	}
	listed, err := codec.ParseParams([]byte(v.Cfg.Params))
	if err != nil {
		return fmt.Errorf("cfg.params: %w", err)
	}
	wrapped, err = codec.WrapParams(bk, id.SN, cfg.RID, listed, nonceOf(cfg.Wrapped))
	if err != nil {
		return fmt.Errorf("cfg: wrap: %w", err)
	}
	if err := rebuild(v.Cfg.vmsg, codec.Control{Kind: codec.KindCfg, Alg: alg, TS: cfg.TS, RID: cfg.RID, Wrapped: wrapped}, id, down); err != nil {
		return fmt.Errorf("cfg: %w", err)
	}

	// acc and the SMS text.
	acc, err := parseSigned(v.AccSMS, codec.KindAcc, alg, id, down)
	if err != nil {
		return fmt.Errorf("acc_sms: %w", err)
	}
	if err := rebuild(v.AccSMS, codec.Control{Kind: codec.KindAcc, Alg: alg, TS: acc.TS, RID: acc.RID}, id, down); err != nil {
		return fmt.Errorf("acc_sms: %w", err)
	}
	sms := codec.SMS{SN: id.SN, RID: acc.RID, Params: listed}
	smsText, err := sms.Encode()
	if err != nil || string(smsText) != v.SMSText {
		return fmt.Errorf("sms_text: built %q want %q (%v)", smsText, v.SMSText, err)
	}
	parsedSMS, err := codec.ParseSMS([]byte(v.SMSText))
	if err != nil {
		return fmt.Errorf("sms_text: parse: %w", err)
	}
	if parsedSMS.SN != id.SN || parsedSMS.RID != cfg.RID {
		return fmt.Errorf("sms_text: sn or rid differ from cfg")
	}

	// ack and done use the new values of cfg.params.
	newUp, newDown := listed.Up, listed.Down
	ack, err := parseSigned(v.Ack, codec.KindAck, alg, id, newUp)
	if err != nil {
		return fmt.Errorf("ack: %w", err)
	}
	newBKD := codec.BasicKeyDigest(alg, listed.BK, listed.BKExp)
	if err := rebuild(v.Ack, codec.Control{Kind: codec.KindAck, Alg: alg, RID: cfg.RID, TS: ack.TS, Nonce: ack.Nonce, BKD: newBKD}, id, newUp); err != nil {
		return fmt.Errorf("ack: %w", err)
	}
	done, err := parseSigned(v.Done, codec.KindDone, alg, id, newDown)
	if err != nil {
		return fmt.Errorf("done: %w", err)
	}
	if err := rebuild(v.Done, codec.Control{Kind: codec.KindDone, Alg: alg, TS: done.TS, RID: cfg.RID}, id, newDown); err != nil {
		return fmt.Errorf("done: %w", err)
	}
	return nil
}

// parseSigned parses a control vector, checks its kind, algorithm and topic
// and verifies its digest with pwd.
func parseSigned(m vmsg, kind codec.Kind, alg codec.Alg, id codec.Identity, pwd []byte) (codec.Control, error) {
	if m.Topic != kind.Topic(id.SN) {
		return codec.Control{}, fmt.Errorf("topic %q, want %q", m.Topic, kind.Topic(id.SN))
	}
	c, err := codec.ParseControl([]byte(m.Payload))
	if err != nil {
		return codec.Control{}, fmt.Errorf("parse: %w", err)
	}
	if c.Kind != kind || c.Alg != alg {
		return codec.Control{}, fmt.Errorf("kind %s alg %s, want %s %s", c.Kind, c.Alg, kind, alg)
	}
	if !c.Verify(id, pwd) {
		return codec.Control{}, fmt.Errorf("digest does not verify")
	}
	if !bytes.Equal(c.Encode(), []byte(m.Payload)) {
		return codec.Control{}, fmt.Errorf("does not re-encode to the same bytes")
	}
	return c, nil
}

// rebuild signs c and requires the vector's payload.
func rebuild(m vmsg, c codec.Control, id codec.Identity, pwd []byte) error {
	got, err := c.Sign(id, pwd)
	if err != nil {
		return fmt.Errorf("build: %w", err)
	}
	if string(got) != m.Payload {
		return fmt.Errorf("built %s want %s", got, m.Payload)
	}
	return nil
}

// nonceOf returns a reader of the 12-byte GCM nonce a wrapped value starts
// with, so that wrapping again reproduces it.
func nonceOf(wrapped string) *bytes.Reader {
	raw, _ := base64.RawURLEncoding.DecodeString(wrapped)
	if len(raw) > 12 {
		raw = raw[:12]
	}
	return bytes.NewReader(raw)
}

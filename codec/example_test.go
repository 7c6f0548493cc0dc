package codec_test

import (
	"bytes"
	"crypto/rand"
	"fmt"

	"github.com/m2mguard/m2mguard/codec"
)

// A terminal builds its CONNECT credentials; a fresh nonce and time go into
// every attempt.
func ExampleLogin_Sign() {
	l := codec.Login{
		Identity: codec.Identity{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"},
		Alg:      codec.HS256,
		TS:       1764316800,
		Nonce:    0x0123456789abcdef,
	}
	password, err := l.Sign([]byte("vkwF2SJaQ7mXc4Lp"))
	if err != nil {
		panic(err)
	}
	fmt.Println(l.ClientID())
	fmt.Println(l.Username())
	fmt.Println(string(password))
	// Output:
	// A00MS8011390002S
	// 354494040518570:460020084678120
	// M2M1.hs256.00.1764316800.0123456789abcdef..d420e7ee6db454de6c208393c7c420420eaff12d881b2b1d83a20a9f08e740e9
}

// The platform parses the CONNECT fields, then verifies the digest with the
// uplink password of the terminal the ClientID names.
func ExampleParseLogin() {
	l, err := codec.ParseLogin("A00MS8011390002S", "354494040518570:460020084678120",
		[]byte("M2M1.md5.00.1764316800.0123456789abcdef..2f9e015e74f680cde951aed1a1bb8eb1"))
	if err != nil {
		fmt.Println("refused:", err)
		return
	}
	fmt.Println(l.Alg, l.TS, l.Nonce, l.WantsSessionKey())
	fmt.Println(l.Verify([]byte("vkwF2SJaQ7mXc4Lp")), l.Verify([]byte("wrongPassword123")))
	// Output:
	// md5 1764316800 0123456789abcdef false
	// true false
}

// The platform signs an err message with the terminal's downlink password;
// the terminal verifies it before acting on it.
func ExampleControl_Sign() {
	id := codec.Identity{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"}
	down := []byte("Uo3aHCbGz8RtY2Nw")
	msg := codec.Control{Kind: codec.KindErr, Alg: codec.MD5, TS: 1764317001, Code: codec.CodeBusy}
	payload, err := msg.Sign(id, down)
	if err != nil {
		panic(err)
	}
	got, err := codec.ParseControl(payload)
	fmt.Println(got.Kind, got.Code, err, got.Verify(id, down))
	// Output: err busy <nil> true
}

// Data travels in envelopes under the session key; each direction has its
// own sequence numbers and nonce prefix.
func ExampleSeal() {
	ks := bytes.Repeat([]byte{1}, codec.SessionKeySize)
	aead, _ := codec.NewAEAD(ks) // once per session, reused for every message
	topic := codec.UpTopic("A00MS8011390002S", "temp")

	env := codec.Seal(nil, aead, codec.Uplink, 1, topic, []byte(`{"t":21.5}`))

	var w codec.Window
	seq, plain, err := codec.Open(nil, aead, codec.Uplink, topic, env)
	if err == nil && w.Check(seq) == codec.Fresh {
		w.Accept(seq)
		fmt.Printf("seq %d: %s\n", seq, plain)
	}
	fmt.Println(w.Check(seq) == codec.Repeated)
	// Output:
	// seq 1: {"t":21.5}
	// true
}

// The session key travels wrapped under the basic key.
func ExampleWrapSessionKey() {
	bk := bytes.Repeat([]byte{2}, codec.BasicKeySize)
	ks := make([]byte, codec.SessionKeySize)
	rand.Read(ks)
	wrapped, _ := codec.WrapSessionKey(bk, "A00MS8011390002S", 7, ks, rand.Reader)
	back, err := codec.UnwrapSessionKey(bk, "A00MS8011390002S", 7, wrapped)
	fmt.Println(bytes.Equal(back, ks), err)
	// Output: true <nil>
}

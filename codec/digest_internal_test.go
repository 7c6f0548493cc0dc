package codec

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"math/rand/v2"
	"testing"
)

// TestHMACSHA256 compares hmacSHA256 with crypto/hmac for keys shorter
// than, as long as and longer than a SHA-256 block, and messages of every
// length up to a few blocks.
func TestHMACSHA256(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(1, 2))
	for _, keyLen := range []int{0, 1, 16, 63, 64, 65, 100, 200} {
		for msgLen := 0; msgLen < 3*sha256.BlockSize+2; msgLen++ {
			key := make([]byte, keyLen)
			msg := make([]byte, msgLen)
			for i := range key {
				key[i] = byte(rng.Uint32())
			}
			for i := range msg {
				msg[i] = byte(rng.Uint32())
			}
			checkHMAC(t, key, msg)
		}
	}
}

// FuzzHMACSHA256 compares hmacSHA256 with crypto/hmac.
func FuzzHMACSHA256(f *testing.F) {
	f.Add([]byte("key"), []byte("message"))
	f.Add(bytes.Repeat([]byte{1}, 65), []byte{})
	f.Fuzz(checkHMAC)
}

func checkHMAC(t *testing.T, key, msg []byte) {
	mac := hmac.New(sha256.New, key)
	mac.Write(msg)
	want := mac.Sum(nil)
	buf := append(make([]byte, sha256.BlockSize), msg...)
	got := hmacSHA256(key, buf)
	if !bytes.Equal(got[:], want) {
		t.Fatalf("key %x msg %x: got %x, want %x", key, msg, got, want)
	}
	if !bytes.Equal(buf[sha256.BlockSize:], msg) {
		t.Fatalf("the message was changed")
	}
}

// TestDigestAllocs: checking a login token or a control message's digest
// allocates nothing, with either algorithm (a login's cost per CONNECT).
func TestDigestAllocs(t *testing.T) {
	id := Identity{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"}
	up := []byte("uplink-password-1")
	for _, alg := range []Alg{MD5, HS256} {
		l := Login{Identity: id, Alg: alg, Flags: FlagSessionKey, TS: 1700000000, Nonce: 0x0123456789abcdef,
			BKD: BasicKeyDigest(alg, make([]byte, BasicKeySize), Never)}
		if _, err := l.Sign(up); err != nil {
			t.Fatal(err)
		}
		if !l.Verify(up) {
			t.Fatalf("%v: the token does not verify", alg)
		}
		if a := testing.AllocsPerRun(100, func() { l.Verify(up) }); a != 0 {
			t.Errorf("%v: Login.Verify allocates %.0f times", alg, a)
		}
		c := Control{Kind: KindDone, Alg: alg, TS: 1700000000, RID: 42}
		if _, err := c.Sign(id, up); err != nil {
			t.Fatal(err)
		}
		if a := testing.AllocsPerRun(100, func() { c.Verify(id, up) }); a != 0 {
			t.Errorf("%v: Control.Verify allocates %.0f times", alg, a)
		}
	}
}

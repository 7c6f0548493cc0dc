package codec_test

import (
	"bytes"
	"testing"

	"github.com/m2mguard/m2mguard/codec"
)

// BenchmarkLoginVerify is the CONNECT hot path: parse the three fields and
// verify the digest.
func BenchmarkLoginVerify(b *testing.B) {
	for _, alg := range []codec.Alg{codec.MD5, codec.HS256} {
		l := codec.Login{Identity: testID, Alg: alg, Flags: codec.FlagSessionKey, TS: 1764316800, Nonce: 42,
			BKD: codec.BasicKeyDigest(alg, testBK, codec.Never)}
		pw, err := l.Sign(testUp)
		if err != nil {
			b.Fatal(err)
		}
		user := testID.Username()
		b.Run(alg.String(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				p, err := codec.ParseLogin(testID.SN, user, pw)
				if err != nil || !p.Verify(testUp) || !codec.BasicKeyDigestEqual(p.BKD, alg, testBK, codec.Never) {
					b.Fatal("does not verify")
				}
			}
		})
	}
}

func BenchmarkEnvelope(b *testing.B) {
	aead, err := codec.NewAEAD(bytes.Repeat([]byte{9}, 32))
	if err != nil {
		b.Fatal(err)
	}
	topic := codec.UpTopic(testID.SN, "temp")
	for _, size := range []int{16, 256, 4096} {
		plain := make([]byte, size)
		buf := make([]byte, 0, size+codec.EnvelopeOverhead)
		env := codec.Seal(nil, aead, codec.Uplink, 1, topic, plain)
		out := make([]byte, 0, size)
		b.Run("seal/"+itoa(size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(size))
			var seq uint64
			for b.Loop() {
				seq++
				buf = codec.Seal(buf[:0], aead, codec.Uplink, seq, topic, plain)
			}
		})
		b.Run("open/"+itoa(size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(size))
			for b.Loop() {
				if _, _, err := codec.Open(out[:0], aead, codec.Uplink, topic, env); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func itoa(n int) string {
	switch n {
	case 16:
		return "16B"
	case 256:
		return "256B"
	}
	return "4KiB"
}

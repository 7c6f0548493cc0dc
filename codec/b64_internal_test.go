package codec

import (
	"bytes"
	"strings"
	"testing"
)

// TestB64Chunked compares encodeB64 with the encoding package and checkB64
// with decodeB64 for every length around the chunk size, and for strings
// that are not canonical.
func TestB64Chunked(t *testing.T) {
	t.Parallel()
	for n := range 3*b64Chunk + 5 {
		src := make([]byte, n)
		for i := range src {
			src[i] = byte(i*37 + n)
		}
		enc := encodeB64(src)
		if want := b64.EncodeToString(src); enc != want {
			t.Fatalf("encodeB64 of %d bytes = %q, want %q", n, enc, want)
		}
		checkB64Same(t, enc)
		checkB64Same(t, enc+"A")
		if n > 0 {
			checkB64Same(t, enc[:len(enc)-1]+"_")
			checkB64Same(t, enc[:len(enc)/2]+"\n"+enc[len(enc)/2:])
			checkB64Same(t, enc+"=")
		}
	}
	checkB64Same(t, strings.Repeat("AA", b64Chunk/2)+"AB") // trailing bits set after a whole chunk
}

// FuzzCheckB64 compares checkB64 with decodeB64.
func FuzzCheckB64(f *testing.F) {
	f.Add("")
	f.Add("AAAA")
	f.Add("AB")
	f.Add(strings.Repeat("A", b64Chunk+2))
	f.Fuzz(checkB64Same)
}

func checkB64Same(t *testing.T, s string) {
	n, ok := checkB64(s)
	b, wantOK := decodeB64([]byte(s))
	if ok != wantOK || ok && n != len(b) {
		t.Fatalf("checkB64(%q) = %d, %v; decodeB64 gives %d bytes, %v", s, n, ok, len(b), wantOK)
	}
}

// TestWrapAADAfterSealed: the aad written after the sealed bytes in wrap's
// buffer gives what Wrap with the same aad apart gives.
func TestWrapAADAfterSealed(t *testing.T) {
	t.Parallel()
	key := bytes.Repeat([]byte{7}, 32)
	ks := bytes.Repeat([]byte{9}, SessionKeySize)
	got, err := WrapSessionKey(key, "A00MS8011390002S", 0x0123456789abcdef, ks, bytes.NewReader(make([]byte, 12)))
	if err != nil {
		t.Fatal(err)
	}
	want, err := Wrap(key, ks, []byte("M2M1.sk.A00MS8011390002S.0123456789abcdef"), bytes.NewReader(make([]byte, 12)))
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("WrapSessionKey = %q, Wrap = %q", got, want)
	}
	if k, err := UnwrapSessionKey(key, "A00MS8011390002S", 0x0123456789abcdef, got); err != nil || !bytes.Equal(k, ks) {
		t.Fatalf("UnwrapSessionKey: %x %v", k, err)
	}
}

// TestCodecAllocs bounds the allocations of the codec's share of an sk
// message: the wrap (the AES and GCM states, the sealed buffer, the
// string) and the signature (the payload, the Digest string).
func TestCodecAllocs(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 32)
	ks := bytes.Repeat([]byte{9}, SessionKeySize)
	rnd := zeroReader{}
	if a := testing.AllocsPerRun(100, func() {
		if _, err := WrapSessionKey(key, "A00MS8011390002S", 1, ks, rnd); err != nil {
			t.Fatal(err)
		}
	}); a > 4 {
		t.Errorf("WrapSessionKey allocates %.0f times, want <= 4", a)
	}
	wrapped, _ := WrapSessionKey(key, "A00MS8011390002S", 1, ks, rnd)
	id := Identity{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"}
	if a := testing.AllocsPerRun(100, func() {
		c := Control{Kind: KindSK, Alg: HS256, TS: 1700000000, Exp: 1700086400, SID: 1, Wrapped: wrapped}
		if _, err := c.Sign(id, []byte("downlink-password")); err != nil {
			t.Fatal(err)
		}
	}); a > 2 {
		t.Errorf("Control.Sign of an sk allocates %.0f times, want <= 2", a)
	}
	if a := testing.AllocsPerRun(100, func() { _ = ID(1).String() }); a > 1 {
		t.Errorf("ID.String allocates %.0f times, want 1", a)
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

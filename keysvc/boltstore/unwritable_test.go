package boltstore_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/keysvc/storetest"
)

// TestStoreFileUnwritable: the store's file stops growing (the disk is
// full; the test caps the file size with RLIMIT_FSIZE, which binds root
// too). Writes then fail with an error; every record written before stays
// readable and intact; nothing half-written appears; and once space is
// back, writes work again on the same file. The capped part runs in a
// child process so that the limit binds nothing else.
func TestStoreFileUnwritable(t *testing.T) {
	if os.Getenv("M2MGUARD_FSIZE_CHILD") != "" {
		unwritableChild()
		return
	}
	t.Parallel()
	path := filepath.Join(t.TempDir(), "m2mguard.db")
	cmd := exec.Command(os.Args[0], "-test.run=^TestStoreFileUnwritable$", "-test.count=1")
	cmd.Env = append(os.Environ(), "M2MGUARD_FSIZE_CHILD="+path)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	var written, failed int
	if _, err := fmt.Sscanf(lastLine(string(out), "RESULT"), "RESULT written=%d failed=%d", &written, &failed); err != nil {
		t.Fatalf("child output: %v\n%s", err, out)
	}
	if written == 0 || failed == 0 {
		t.Fatalf("written %d, failed %d: the limit did not bite", written, failed)
	}
	// Without the limit: everything written is there and intact, and the
	// store takes writes again.
	s := openAt(t, path)
	defer s.Close()
	ctx := t.Context()
	names, err := s.ListTerminals(ctx, "", 0)
	if err != nil || len(names) != written {
		t.Fatalf("after the disk filled: %d records readable (%v), want %d", len(names), err, written)
	}
	for _, sn := range names {
		got, err := s.GetTerminal(ctx, sn)
		if err != nil || storetest.Diff(got, storetest.Terminal(sn)) != "" {
			t.Fatalf("record %s damaged: %v", sn, err)
		}
	}
	if err := s.CreateTerminal(ctx, storetest.Terminal("AFTERFULL")); err != nil {
		t.Fatalf("write after space came back: %v", err)
	}
	t.Logf("%d records written before the file hit its limit, %d writes refused after; all intact", written, failed)
}

func unwritableChild() {
	path := os.Getenv("M2MGUARD_FSIZE_CHILD")
	s, err := boltstore.Open(path, boltstore.Options{MasterKey: testKey})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	st, _ := os.Stat(path)
	limit := uint64(st.Size()) + 256<<10
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &syscall.Rlimit{Cur: limit, Max: limit}); err != nil {
		fmt.Println("setrlimit:", err)
		os.Exit(1)
	}
	ctx := context.Background()
	written, failed := 0, 0
	for i := 0; i < 100000 && failed < 20; i++ {
		err := s.CreateTerminal(ctx, storetest.Terminal(fmt.Sprintf("T%06d", i)))
		if err != nil {
			failed++
			continue
		}
		if failed > 0 {
			fmt.Println("a write succeeded after one failed")
			os.Exit(1)
		}
		written++
	}
	s.Close()
	fmt.Printf("RESULT written=%d failed=%d\n", written, failed)
}

func lastLine(out, prefix string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

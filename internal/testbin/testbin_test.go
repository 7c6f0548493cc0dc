package testbin

import (
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// identity is the file's inode, size and SHA-256: the go command touches
// an up-to-date binary (its mtime changes) without writing it.
func identity(t *testing.T, name string) string {
	t.Helper()
	data, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("inode %d, %d bytes, sha256 %x", fi.Sys().(*syscall.Stat_t).Ino, len(data), sha256.Sum256(data))
}

// TestCommandsBuildOnceAndShare: concurrent builds of the same command
// (two test processes) each get a binary that runs, in the repository's
// .bin/test/, and a second build of unchanged code leaves the binary as it
// was (no relink).
func TestCommandsBuildOnceAndShare(t *testing.T) {
	const pkg = module + "/cmd/m2mctl"
	var wg sync.WaitGroup
	bins := make([][]string, 2)
	errs := make([]error, 2)
	for i := range bins {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bins[i], errs[i] = Commands(pkg)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("build %d: %v", i, err)
		}
	}
	bin := bins[0][0]
	if bins[1][0] != bin || filepath.Base(bin) != "m2mctl" || filepath.Base(filepath.Dir(bin)) != "test" {
		t.Fatalf("binaries %v and %v, want .bin/test/m2mctl", bins[0], bins[1])
	}
	before := identity(t, bin)
	out, err := exec.Command(bin, "--help").CombinedOutput()
	if !strings.Contains(string(out), "m2mctl") {
		t.Fatalf("%s --help: %v\n%s", bin, err, out)
	}
	start := time.Now()
	if _, err := Commands(pkg); err != nil {
		t.Fatal(err)
	}
	if after := identity(t, bin); after != before {
		t.Errorf("unchanged code: the binary was written again (%s, then %s)", before, after)
	}
	t.Logf("second build of unchanged code: %v", time.Since(start).Round(time.Millisecond))
	if _, err := Commands("example.com/other"); err == nil {
		t.Error("a package outside the module was accepted")
	}
}

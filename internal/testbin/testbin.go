package testbin

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"syscall"
)

// module is the main module's path.
const module = "github.com/m2mguard/m2mguard"

// Dir returns .bin/test/ of the repository that holds the working
// directory, creating it.
func Dir() (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, ".bin", "test")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("testbin: %w", err)
	}
	return dir, nil
}

// Locked runs fn with Dir while it holds the directory's lock, which every
// build into it takes: fn may run go build into dir (another test process
// waits, then finds the binary up to date).
func Locked(fn func(dir string) error) error {
	dir, err := Dir()
	if err != nil {
		return err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("testbin: %w", err)
	}
	defer lock.Close() // releases the lock
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("testbin: lock %s: %w", lock.Name(), err)
	}
	return fn(dir)
}

// Commands builds the main packages pkgs (import paths in this module)
// into Dir with one go build and returns the binaries' paths, in order.
func Commands(pkgs ...string) ([]string, error) {
	var bins []string
	err := Locked(func(dir string) error {
		bins = bins[:0]
		for _, p := range pkgs {
			if p != module && !strings.HasPrefix(p, module+"/") {
				return fmt.Errorf("testbin: %s is not a package of %s", p, module)
			}
			bins = append(bins, filepath.Join(dir, path.Base(p)))
		}
		cmd := exec.Command("go", append([]string{"build", "-o", dir + string(filepath.Separator)}, pkgs...)...)
		cmd.Dir = filepath.Dir(filepath.Dir(dir)) // the repository's root
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("testbin: go build %s: %w\n%s", strings.Join(pkgs, " "), err, out)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return bins, nil
}

// repoRoot walks up from the working directory to the main module's go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.HasPrefix(string(data), "module "+module+"\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("testbin: the m2mguard repository's root not found above the working directory")
		}
		dir = parent
	}
}

//go:build !unix

package replay

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// ErrLocked: another process holds the directory (never returned on this
// platform: it has no flock).
var ErrLocked = errors.New("replay: directory in use by another process")

// lockDir only opens dir/lock: this platform has no flock(2), so two
// processes on one directory are not detected.
func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("replay: %w", err)
	}
	return f, nil
}

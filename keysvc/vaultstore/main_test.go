package vaultstore_test

import (
	"os"
	"testing"

	"github.com/m2mguard/m2mguard/internal/testwait"
)

// TestMain runs 4 parallel tests per CPU at a time, not go test's default
// of one: they mostly wait for Vault servers of their own (start, token TTLs).
func TestMain(m *testing.M) {
	testwait.SetParallel(4)
	os.Exit(m.Run())
}

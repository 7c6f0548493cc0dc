package boltstore

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
)

// EnvMasterKey is the environment variable LoadOrCreateMasterKey reads first.
const EnvMasterKey = "M2MGUARD_MASTER_KEY"

// LoadOrCreateMasterKey returns the master key: from the environment
// variable env (EnvMasterKey if ""), base64 (standard or URL alphabet, padded
// or not) of MasterKeySize bytes, if it is set; else from keyFile, which is
// created on first run with mode 0600 holding fresh random bytes. A key file
// readable or writable by group or others is refused.
func LoadOrCreateMasterKey(env, keyFile string) ([]byte, error) {
	if env == "" {
		env = EnvMasterKey
	}
	if v, ok := os.LookupEnv(env); ok {
		k, err := decodeKey(strings.TrimSpace(v))
		if err != nil {
			return nil, fmt.Errorf("boltstore: $%s: %w", env, err)
		}
		return k, nil
	}
	if keyFile == "" {
		return nil, fmt.Errorf("boltstore: no master key: set $%s or give a key file", env)
	}
	k, err := readKeyFile(keyFile)
	if !errors.Is(err, fs.ErrNotExist) {
		return k, err
	}
	f, err := os.OpenFile(keyFile, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) { // lost a race with another process
		return readKeyFile(keyFile)
	}
	if err != nil {
		return nil, fmt.Errorf("boltstore: create master key file: %w", err)
	}
	k = make([]byte, MasterKeySize)
	if _, err := io.ReadFull(rand.Reader, k); err != nil {
		f.Close()
		os.Remove(keyFile)
		return nil, fmt.Errorf("boltstore: create master key: %w", err)
	}
	_, err = f.Write([]byte(base64.StdEncoding.EncodeToString(k) + "\n"))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(keyFile)
		return nil, fmt.Errorf("boltstore: write master key file: %w", err)
	}
	return k, nil
}

func readKeyFile(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("boltstore: master key file: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("boltstore: master key file %s is not a regular file", name)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("boltstore: master key file %s has mode %04o; want 0600 or stricter (chmod 600)", name, st.Mode().Perm())
	}
	b, err := io.ReadAll(io.LimitReader(f, 1024))
	if err != nil {
		return nil, fmt.Errorf("boltstore: read master key file: %w", err)
	}
	k, err := decodeKey(strings.TrimSpace(string(b)))
	clear(b)
	if err != nil {
		return nil, fmt.Errorf("boltstore: master key file %s: %w", name, err)
	}
	return k, nil
}

func decodeKey(s string) ([]byte, error) {
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if k, err := enc.DecodeString(s); err == nil {
			if len(k) != MasterKeySize {
				return nil, fmt.Errorf("want base64 of %d bytes, got %d bytes", MasterKeySize, len(k))
			}
			return k, nil
		}
	}
	return nil, errors.New("not valid base64")
}

// ParseMasterKey decodes a master key as $M2MGUARD_MASTER_KEY holds it
// (base64, standard or URL alphabet, padded or not, of MasterKeySize
// bytes), for a configuration check before the store is opened. The error
// never contains the value.
func ParseMasterKey(s string) ([]byte, error) { return decodeKey(strings.TrimSpace(s)) }

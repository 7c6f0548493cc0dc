package broker

import (
	"fmt"
	"os"

	"github.com/m2mguard/m2mguard/broker/admin"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

// Check validates what Start would refuse although Resolve accepts it,
// without creating or opening anything: the master key in
// $M2MGUARD_MASTER_KEY (lookup reads the environment), which the embedded
// store and the session store (mqtt.persistence) use, and the operators of
// admin.tokens_file. It is the part of
// `m2mguard-broker --check` after Resolve; errors are *ConfigError.
func Check(cfg *Config, lookup func(string) (string, bool)) error {
	if cfg.Store.Type != "vault" || cfg.MQTT.Persistence != "off" {
		if v, ok := lookup(boltstore.EnvMasterKey); ok {
			k, err := boltstore.ParseMasterKey(v)
			clear(k)
			if err != nil {
				return &ConfigError{Key: "store.embedded.master_key_file", Source: "env " + boltstore.EnvMasterKey, Err: err}
			}
		}
	}
	if path := cfg.Admin.TokensFile; path != "" {
		f, err := os.Open(path)
		if err != nil {
			return &ConfigError{Key: "admin.tokens_file", Err: err}
		}
		defer f.Close()
		if _, err := admin.ParseOperators(f); err != nil {
			return &ConfigError{Key: "admin.tokens_file", Err: fmt.Errorf("%s: %w", path, err)}
		}
	}
	return nil
}

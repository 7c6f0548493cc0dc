// Package cliflag binds command-line flags to environment variables for the
// project's command-line tools.
package cliflag

import (
	"os"

	"github.com/spf13/pflag"
)

// Env binds flag name of fs to the environment variable: the variable's
// value, if set and valid, becomes the default, and the flag overrides it.
// The variable's name is appended to the flag's help.
func Env(fs *pflag.FlagSet, name, variable string) {
	f := fs.Lookup(name)
	f.Usage += " [$" + variable + "]"
	if v, ok := os.LookupEnv(variable); ok && v != "" {
		if err := f.Value.Set(v); err == nil {
			f.DefValue = v
		}
	}
}

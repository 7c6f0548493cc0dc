// Package cliflag binds command-line flags to environment variables for the
// project's command-line tools.
package cliflag

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"

	"github.com/spf13/pflag"
)

// Env binds flag name of fs to the environment variable: the variable's
// value, if set, becomes the default, and the flag overrides it. The
// variable's name is appended to the flag's help. A value the flag does not
// accept is an error naming the variable.
func Env(fs *pflag.FlagSet, name, variable string) error {
	f := fs.Lookup(name)
	f.Usage += " [$" + variable + "]"
	v, ok := os.LookupEnv(variable)
	if !ok || v == "" {
		return nil
	}
	if err := f.Value.Set(v); err != nil {
		return fmt.Errorf("$%s: invalid value for --%s: %w", variable, name, err)
	}
	f.DefValue = v
	return nil
}

// EnvAll binds each flag to its variable (flag name → variable), in the
// order of the flag names, and returns every error of Env, joined.
func EnvAll(fs *pflag.FlagSet, vars map[string]string) error {
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(vars)) {
		errs = append(errs, Env(fs, name, vars[name]))
	}
	return errors.Join(errs...)
}

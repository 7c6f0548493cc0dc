// Package cliflag binds command-line flags to environment variables for the
// project's command-line tools.
package cliflag

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/spf13/pflag"
)

// Env binds flag name of fs to the environment variable: the variable's
// value, if set, becomes the default, and the flag overrides it. The
// variable's name is appended to the flag's help. A value the flag does not
// accept is an error naming the variable; the flag keeps its default.
func Env(fs *pflag.FlagSet, name, variable string) error {
	f := fs.Lookup(name)
	f.Usage += " [$" + variable + "]"
	v, ok := os.LookupEnv(variable)
	if !ok || v == "" {
		return nil
	}
	if err := f.Value.Set(v); err != nil {
		restore(f) // a failed Set may leave a zero value (durations do)
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

// restore puts the flag's default back.
func restore(f *pflag.Flag) {
	if sv, ok := f.Value.(pflag.SliceValue); ok {
		// A slice's DefValue is its printed form ("[a,b]"), not its input.
		sv.Replace(nil)
		if d := strings.Trim(f.DefValue, "[]"); d != "" {
			sv.Replace(strings.Split(d, ","))
		}
		return
	}
	f.Value.Set(f.DefValue)
}

// Package cliflag is the command-line scaffolding the project's tools
// (m2mctl, m2m-terminal) share: flags bound to environment variables, usage
// errors (exit 2) and the set-up of their cobra command trees.
package cliflag

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/spf13/cobra"
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

// UsageError is an error of the command line itself (a bad flag, argument
// or input file): the tools exit 2 for it and point at --help.
type UsageError struct{ Err error }

// Error returns the message of the wrapped error.
func (e UsageError) Error() string { return e.Err.Error() }

// Unwrap returns the wrapped error.
func (e UsageError) Unwrap() error { return e.Err }

// Usagef returns a UsageError with a formatted message.
func Usagef(format string, a ...any) error { return UsageError{fmt.Errorf(format, a...)} }

// IsUsage reports whether err is a usage error: a UsageError, or one of
// cobra's own errors for an unknown command or flag.
func IsUsage(err error) bool {
	var ue UsageError
	if errors.As(err, &ue) {
		return true
	}
	s := err.Error()
	return strings.HasPrefix(s, "unknown command") || strings.HasPrefix(s, "unknown flag") || strings.HasPrefix(s, "unknown shorthand flag")
}

// Prepare sets up the command tree of a tool the same way for every tool:
// cobra prints neither usage nor errors (the tool does, once); flag and
// argument errors are UsageErrors; a runnable command without Args takes
// none; every runnable command's help ends with exitHelp; a command group
// run without a subcommand is a usage error. envErr, if not nil (the
// error of EnvAll), is returned as a usage error by every command before it
// runs.
func Prepare(root *cobra.Command, exitHelp string, envErr error) {
	root.SilenceUsage, root.SilenceErrors = true, true
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return UsageError{err} })
	var fix func(c *cobra.Command)
	fix = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			fix(sub)
		}
		if !c.Runnable() {
			c.RunE = func(cmd *cobra.Command, args []string) error {
				if len(args) > 0 {
					return Usagef("unknown command %q for %q", args[0], cmd.CommandPath())
				}
				return Usagef("%s needs a subcommand (see --help)", cmd.CommandPath())
			}
			c.Args = cobra.ArbitraryArgs
			return
		}
		if c == root {
			return
		}
		if c.Long == "" {
			c.Long = c.Short
		}
		c.Long += "\n\n" + exitHelp
		if c.Args == nil {
			c.Args = cobra.NoArgs
		}
		check := c.Args
		c.Args = func(cmd *cobra.Command, args []string) error {
			if envErr != nil {
				return UsageError{envErr}
			}
			if err := check(cmd, args); err != nil {
				return UsageError{err}
			}
			return nil
		}
	}
	fix(root)
}

package cliflag

import (
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

func TestEnv(t *testing.T) {
	tests := []struct {
		name, env string
		want      time.Duration
		err       string
	}{
		{"unset", "", 30 * time.Second, ""},
		{"valid", "5s", 5 * time.Second, ""},
		{"invalid", "soon", 30 * time.Second, "$CLIFLAG_TEST_TIMEOUT: invalid value for --timeout"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("CLIFLAG_TEST_TIMEOUT", tc.env)
			fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
			d := fs.Duration("timeout", 30*time.Second, "how long")
			err := EnvAll(fs, map[string]string{"timeout": "CLIFLAG_TEST_TIMEOUT"})
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("err %v, want %q", err, tc.err)
			}
			if *d != tc.want {
				t.Errorf("value %v, want %v", *d, tc.want)
			}
			if u := fs.Lookup("timeout").Usage; !strings.HasSuffix(u, "[$CLIFLAG_TEST_TIMEOUT]") {
				t.Errorf("usage %q does not name the variable", u)
			}
		})
	}
	// The flag overrides the variable.
	t.Setenv("CLIFLAG_TEST_TIMEOUT", "5s")
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	d := fs.Duration("timeout", 30*time.Second, "how long")
	if err := Env(fs, "timeout", "CLIFLAG_TEST_TIMEOUT"); err != nil {
		t.Fatal(err)
	}
	if err := fs.Parse([]string{"--timeout", "7s"}); err != nil || *d != 7*time.Second {
		t.Fatalf("after --timeout 7s: %v, %v", *d, err)
	}
}

// A slice the variable cannot set keeps its default.
func TestEnvSliceKeepsDefault(t *testing.T) {
	t.Setenv("CLIFLAG_TEST_BROKERS", `"tcp://a`) // an unterminated CSV quote
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	b := fs.StringSlice("broker", []string{"tcp://x:1883", "tcp://y:1883"}, "brokers")
	if err := Env(fs, "broker", "CLIFLAG_TEST_BROKERS"); err == nil {
		t.Fatal("bad CSV accepted")
	}
	if got := strings.Join(*b, ","); got != "tcp://x:1883,tcp://y:1883" {
		t.Errorf("value %q, want the default", got)
	}
}

func TestPrepare(t *testing.T) {
	newTree := func(envErr error) *cobra.Command {
		root := &cobra.Command{Use: "tool"}
		group := &cobra.Command{Use: "group", Short: "a group"}
		group.AddCommand(&cobra.Command{Use: "one ARG", Short: "takes one", Args: cobra.ExactArgs(1), RunE: func(*cobra.Command, []string) error { return nil }})
		root.AddCommand(group, &cobra.Command{Use: "plain", Short: "takes none", RunE: func(*cobra.Command, []string) error { return nil }})
		Prepare(root, "Exit codes: 0 ok", envErr)
		root.SetOut(io.Discard)
		root.SetErr(io.Discard)
		return root
	}
	for _, tc := range []struct {
		name   string
		args   []string
		envErr error
		usage  bool // the error is a usage error
		ok     bool
	}{
		{"runs", []string{"group", "one", "x"}, nil, false, true},
		{"plain", []string{"plain"}, nil, false, true},
		{"missing argument", []string{"group", "one"}, nil, true, false},
		{"argument to a command that takes none", []string{"plain", "x"}, nil, true, false},
		{"group alone", []string{"group"}, nil, true, false},
		{"unknown subcommand", []string{"group", "nope"}, nil, true, false},
		{"unknown flag", []string{"plain", "--nope"}, nil, true, false},
		{"bad environment", []string{"plain"}, errors.New("$X: invalid value"), true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := newTree(tc.envErr)
			root.SetArgs(tc.args)
			err := root.Execute()
			if tc.ok != (err == nil) || (err != nil && IsUsage(err) != tc.usage) {
				t.Fatalf("err %v (usage %t), want ok %t usage %t", err, err != nil && IsUsage(err), tc.ok, tc.usage)
			}
		})
	}
	root := newTree(nil)
	plain, _, _ := root.Find([]string{"plain"})
	if !strings.HasSuffix(plain.Long, "takes none\n\nExit codes: 0 ok") {
		t.Fatalf("help of a command: %q", plain.Long)
	}
	if IsUsage(errors.New("connection refused")) || !IsUsage(Usagef("--x: want y")) {
		t.Fatal("IsUsage")
	}
}

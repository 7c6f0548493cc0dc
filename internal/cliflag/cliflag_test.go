package cliflag

import (
	"strings"
	"testing"
	"time"

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

package keysvc_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/m2mguard/m2mguard/keysvc"
)

func TestAppOwnsClientID(t *testing.T) {
	tests := []struct {
		name, clientID string
		want           bool
	}{
		{"dash", "dash", true},
		{"dash", "dash-1", true},
		{"dash", "dash-", true},
		{"dash", "dash-east-1", true},
		{"dash", "", true}, // assigned by the broker
		{"dash.east", "dash.east-2", true},
		{"dash", "dashboard", false},
		{"dash", "dash.east-1", false},
		{"dash", "dash_1", false},
		{"dash", "Dash-1", false},
		{"dash", "x-dash-1", false},
		{"dash-east", "dash-1", false},
		{"dash-east", "dash", false},
	}
	for _, tc := range tests {
		if got := keysvc.AppOwnsClientID(tc.name, tc.clientID); got != tc.want {
			t.Errorf("AppOwnsClientID(%q, %q) = %v, want %v", tc.name, tc.clientID, got, tc.want)
		}
	}
}

// TestAddAppRefusesOverlappingNames: no two applications own the same
// ClientIDs, whichever of the two names is added first; names that only
// share a prefix without the '-' do not overlap, and replacing an
// application under its own name still works.
func TestAddAppRefusesOverlappingNames(t *testing.T) {
	tests := []struct {
		existing, name string
		other          string // the application the error must name; "" = accepted
	}{
		{"dash", "dash-east", "dash"},
		{"dash-east", "dash", "dash-east"},
		{"dash", "dash-east-1", "dash"},
		{"dash", "dash-", "dash"},
		{"dash", "dashboard", ""},
		{"dash", "dash.east", ""},
		{"dash", "dash_east", ""},
		{"dash-east", "dash-west", ""},
		{"dash", "dash", ""}, // replace
	}
	for _, tc := range tests {
		t.Run(tc.existing+"+"+tc.name, func(t *testing.T) {
			svc, _ := newTestService(t)
			ctx := context.Background()
			pw := []byte("twelve-bytes-or-more")
			if _, err := svc.AddApp(ctx, keysvc.AddAppRequest{Name: tc.existing, Password: pw}); err != nil {
				t.Fatal(err)
			}
			_, err := svc.AddApp(ctx, keysvc.AddAppRequest{Name: tc.name, Password: pw})
			if tc.other == "" {
				if err != nil {
					t.Fatalf("add %s beside %s: %v", tc.name, tc.existing, err)
				}
				return
			}
			if !errors.Is(err, keysvc.ErrExists) || !strings.Contains(err.Error(), "application "+tc.other+" ") {
				t.Fatalf("add %s beside %s: %v, want ErrExists naming %s", tc.name, tc.existing, err, tc.other)
			}
			if names, _ := svc.ListApps(ctx); len(names) != 1 {
				t.Fatalf("applications %v after the refusal, want only %s", names, tc.existing)
			}
		})
	}
}

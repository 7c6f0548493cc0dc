package broker

import (
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
	"github.com/m2mguard/m2mguard/netguard"
	"github.com/m2mguard/m2mguard/sms"
	"github.com/m2mguard/m2mguard/wslistener"
)

// TestDefaultsAreTheLibraries: every setting the broker passes to a library
// is, by default, the library's own default (or zero, which the library
// turns into it). A default written into Default() as a literal that
// differs from the library's fails here.
func TestDefaultsAreTheLibraries(t *testing.T) {
	c := Default()
	for _, tc := range []struct {
		name      string
		passed    any // what Start passes for Default()
		libraries any // the library's defaults
	}{
		{"hook", hookOptions(c), hook.DefaultOptions()},
		{"keysvc", serviceOptions(c), keysvc.DefaultOptions()},
		{"netguard", guardOptions(c), netguard.DefaultOptions()},
		{"vaultstore", c.Store.Vault, vaultstore.DefaultConfig()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := sameOrZero(t, tc.name, reflect.ValueOf(tc.passed), reflect.ValueOf(tc.libraries))
			if n == 0 {
				t.Fatal("the broker sets none of the library's defaults: the comparison compares nothing")
			}
		})
	}
	for _, d := range []struct {
		key             string
		broker, library time.Duration
	}{
		{"sms.timeout", c.SMS.Timeout, sms.DefaultTimeout},
		{"sms.backoff", c.SMS.Backoff, sms.DefaultBackoff},
		{"sms.max_backoff", c.SMS.MaxBackoff, sms.DefaultMaxBackoff},
		{"sms.max_retry_after", c.SMS.MaxRetryAfter, sms.DefaultMaxRetryAfter},
	} {
		if d.broker != d.library {
			t.Errorf("%s: the broker's default is %v, package sms's %v", d.key, d.broker, d.library)
		}
	}
	if c.MQTT.ConnectTimeout != wslistener.DefaultConnectTimeout {
		t.Errorf("mqtt.connect_timeout %v (the WebSocket listener's too), wslistener's default %v",
			c.MQTT.ConnectTimeout, wslistener.DefaultConnectTimeout)
	}
}

// sameOrZero compares passed with def field by field (into nested
// structs) and reports every field that is neither zero (the library's
// default applies) nor equal to def's. It returns how many fields the
// broker sets to a non-zero default. Funcs, interfaces and pointers are
// the caller's runtime parts and not compared.
func sameOrZero(t *testing.T, path string, passed, def reflect.Value) int {
	t.Helper()
	switch passed.Kind() {
	case reflect.Struct:
		n := 0
		for i := range passed.NumField() {
			f := passed.Type().Field(i)
			if !f.IsExported() {
				continue
			}
			n += sameOrZero(t, path+"."+f.Name, passed.Field(i), def.Field(i))
		}
		return n
	case reflect.Func, reflect.Interface, reflect.Pointer, reflect.Slice, reflect.Map:
		return 0
	}
	if passed.IsZero() {
		return 0
	}
	if !passed.Equal(def) {
		t.Errorf("%s: the broker's default is %v, the library's %v", path, passed, def)
	}
	return 1
}

// TestWrittenDefaultsDescribeDerivedValues: a field's Default is written
// by hand only for a key whose value in Default() is empty and is worked
// out at start (a file in data_dir, $VAULT_ADDR); every other documented
// default is read from Default().
func TestWrittenDefaultsDescribeDerivedValues(t *testing.T) {
	d := Default()
	for _, f := range Fields() {
		got := f.value.get(d)
		if f.Default != got && got != "" {
			t.Errorf("%s: documented default %q, Default() holds %q", f.Key, f.Default, got)
		}
	}
}

// TestValidateChangesNothing: Validate leaves the configuration as it was;
// Derive fills the files in data_dir.
func TestValidateChangesNothing(t *testing.T) {
	c := Default()
	before := *c
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(*c, before) {
		t.Fatalf("Validate changed the configuration:\n%+v\n%+v", before, *c)
	}
	c.Derive()
	if c.Store.Embedded.File != filepath.Join("data", "m2mguard.db") || c.Admin.MetricsTokenFile != filepath.Join("data", "metrics.token") {
		t.Fatalf("Derive: %+v %+v", c.Store.Embedded, c.Admin)
	}
}

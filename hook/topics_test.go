package hook

import "testing"

func TestMatchTopic(t *testing.T) {
	tests := []struct {
		filter, topic string
		want          bool
	}{
		{"m2m/+/up/#", "m2m/A1/up/temp", true},
		{"m2m/+/up/#", "m2m/A1/up/a/b", true},
		{"m2m/+/up/#", "m2m/A1/up", true},
		{"m2m/+/up/#", "m2m/A1/down/x", false},
		{"m2m/+/up/#", "m2m/A1/B/up/x", false},
		{"#", "m2m/A1/up/x", true},
		{"#", "$m2m/A1/key", false},
		{"+/A1/key", "$m2m/A1/key", false},
		{"$m2m/A1/key", "$m2m/A1/key", true},
		{"$m2m/+/key", "$m2m/A1/key", true},
		{"a/b", "a/b/c", false},
		{"a/b/c", "a/b", false},
		{"a/+", "a/", true},
		{"a/+/c", "a//c", true},
	}
	for _, tc := range tests {
		if got := matchTopic(tc.filter, tc.topic); got != tc.want {
			t.Errorf("matchTopic(%q, %q) = %v, want %v", tc.filter, tc.topic, got, tc.want)
		}
	}
}

func TestFilterWithin(t *testing.T) {
	tests := []struct {
		filter, reach string
		want          bool
	}{
		{"m2m/+/up/#", "m2m/+/up/#", true},
		{"m2m/A1/up/#", "m2m/+/up/#", true},
		{"m2m/A1/up/temp", "m2m/+/up/#", true},
		{"m2m/+/up/+", "m2m/+/up/#", true},
		{"m2m/A1/up", "m2m/+/up/#", true},
		{"#", "m2m/+/up/#", false},
		{"m2m/#", "m2m/+/up/#", false},
		{"+/+/up/#", "m2m/+/up/#", false},
		{"m2m/+/+/#", "m2m/+/up/#", false},
		{"m2m/A1/down/#", "m2m/A1/down/#", true},
		{"m2m/A2/down/#", "m2m/A1/down/#", false},
		{"m2m/A1/down/x/#", "m2m/A1/down/#", true},
		{"$m2m/A1/key", "#", false},
		{"$m2m/A1/key", "$m2m/A1/key", true},
		{"a/b", "a/+", true},
		{"a/+", "a/b", false},
		{"a/b/c", "a/b", false},
		{"a", "a/b", false},
	}
	for _, tc := range tests {
		if got := filterWithin(tc.filter, tc.reach); got != tc.want {
			t.Errorf("filterWithin(%q, %q) = %v, want %v", tc.filter, tc.reach, got, tc.want)
		}
	}
}

// FuzzFilterWithin checks filterWithin against matchTopic: if a filter is
// within a reach, every topic the filter matches is matched by the reach.
func FuzzFilterWithin(f *testing.F) {
	f.Add("m2m/+/up/#", "m2m/+/up/#", "m2m/A/up/x")
	f.Add("a/#", "a/+/#", "a/b")
	f.Add("#", "#", "$x")
	f.Fuzz(func(t *testing.T, filter, reach, topic string) {
		if hasWildcard(topic) || !validFilter(filter) || !validFilter(reach) || !filterWithin(filter, reach) {
			return
		}
		if matchTopic(filter, topic) && !matchTopic(reach, topic) {
			t.Fatalf("filter %q within %q, but %q matches only the filter", filter, reach, topic)
		}
	})
}

package fleetroute

import (
	"errors"
	"strings"
	"testing"
)

func TestTopicSubjectRoundTrip(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ topic, subject string }{
		{"m2m/A1/up/t", "m2mguard.up.m2m.A1.up.t"},
		{"m2m/A1/up/t/x.y", "m2mguard.up.m2m.A1.up.t.x_2Ey"},
		{"m2m/A1/up/", "m2mguard.up.m2m.A1.up._"},
		{"m2m/A1/up//a", "m2mguard.up.m2m.A1.up._.a"},
		{"/", "m2mguard.up._._"},
		{"a_b/*/>/+/#", "m2mguard.up.a_5Fb._2A._3E._2B._23"},
		{"m2m/A1/up/temp érature", "m2mguard.up.m2m.A1.up.temp_20_C3_A9rature"},
		{"m2m/A1/up/_", "m2mguard.up.m2m.A1.up._5F"},
	} {
		got, err := TopicSubject(UplinkPrefix, tc.topic)
		if err != nil || got != tc.subject {
			t.Errorf("TopicSubject(%q) = %q, %v; want %q", tc.topic, got, err, tc.subject)
			continue
		}
		back, err := SubjectTopic(UplinkPrefix, got)
		if err != nil || back != tc.topic {
			t.Errorf("SubjectTopic(%q) = %q, %v; want %q", got, back, err, tc.topic)
		}
	}
}

func TestSubjectTopicRefuses(t *testing.T) {
	t.Parallel()
	for _, s := range []string{
		"m2mguard.up.",       // nothing after the prefix
		"m2mguard.evt.x",     // another prefix
		"m2mguard.up.a..b",   // an empty token
		"m2mguard.up.a._5F_", // a token EscapeKey cannot have written
		"m2mguard.up.a_41",   // a needless escape ('A')
		"m2mguard.up.__",     // '_' alone is an empty level, '__' nothing
		"m2mguard.up.a.*",    // a wildcard token
		"m2mguard.up.a_2e",   // lower-case hex
		"m2mguard.up.0_2F",   // an escaped '/': two levels in one token (found by FuzzSubjectTopic)
		"m2mguard.up." + strings.Repeat("a.", MaxSubject/2), // too long
	} {
		if topic, err := SubjectTopic(UplinkPrefix, s); !errors.Is(err, ErrSubject) {
			t.Errorf("SubjectTopic(%q) = %q, %v; want an ErrSubject", s, topic, err)
		}
	}
	if _, err := TopicSubject(UplinkPrefix, "m2m/A1/up/"+strings.Repeat("é", MaxSubject/4)); !errors.Is(err, ErrSubject) {
		t.Errorf("a topic too long for a subject: %v, want an ErrSubject", err)
	}
}

// FuzzSubjectTopic: every subject SubjectTopic accepts is the one
// TopicSubject writes for its topic (one subject per topic), and every
// topic TopicSubject accepts comes back unchanged.
func FuzzSubjectTopic(f *testing.F) {
	for _, s := range []string{"m2mguard.up.m2m.A1.up.t", "m2mguard.up._._", "m2mguard.up.a_5Fb._2A", "m2mguard.up.x_2Ey", "m2mguard.up.__", "m2m/A1/up//x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if topic, err := SubjectTopic(UplinkPrefix, s); err == nil {
			again, err := TopicSubject(UplinkPrefix, topic)
			if err != nil || again != s {
				t.Fatalf("subject %q is topic %q, whose subject is %q (%v)", s, topic, again, err)
			}
		}
		if subj, err := TopicSubject(UplinkPrefix, s); err == nil {
			if strings.ContainsAny(subj[len(UplinkPrefix):], "*> \t\r\n") || strings.Contains(subj, "..") || strings.HasSuffix(subj, ".") {
				t.Fatalf("topic %q: subject %q has a wildcard, blank or empty token", s, subj)
			}
			back, err := SubjectTopic(UplinkPrefix, subj)
			if err != nil || back != s {
				t.Fatalf("topic %q: subject %q back to %q (%v)", s, subj, back, err)
			}
		}
	})
}

package main

import (
	"bytes"
	"errors"
	"os"
	"testing"
	"time"
)

func TestParseStatus(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    procMem
		wantErr bool
	}{
		{"linux", "Name:\tm2mguard-broker\nVmPeak:\t 1245184 kB\nVmHWM:\t   40960 kB\nVmRSS:\t   16384 kB\nThreads:\t8\n", procMem{RSS: 16 << 20, HWM: 40 << 20}, false},
		{"no HWM", "VmRSS: 1 kB\n", procMem{RSS: 1024}, false},
		{"no RSS (zombie)", "Name:\tx\nState:\tZ (zombie)\n", procMem{}, true},
		{"bad unit", "VmRSS:\t16384 MB\n", procMem{}, true},
		{"negative", "VmRSS:\t-1 kB\n", procMem{}, true},
		{"not a number", "VmRSS:\tlots kB\n", procMem{}, true},
		{"too large", "VmRSS:\t99999999999999 kB\n", procMem{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStatus([]byte(tt.in))
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("parseStatus = %+v, %v; want %+v (error %v)", got, err, tt.want, tt.wantErr)
			}
		})
	}
	if _, err := parseStatus(bytes.Repeat([]byte("x"), maxStatusLen+1)); err == nil {
		t.Error("oversize status accepted")
	}
	if _, err := parseStatus(nil); !errors.Is(err, errNoRSS) {
		t.Errorf("empty: %v", err)
	}
}

func TestReadOwnMem(t *testing.T) {
	m, err := readMem(os.Getpid())
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	if m.RSS <= 0 || m.HWM < m.RSS {
		t.Fatalf("%+v", m)
	}
	fired := make(chan int64, 1)
	w := watchMem(os.Getpid(), 1, time.Millisecond, func(rss int64) { fired <- rss })
	defer w.Stop()
	if rss := <-fired; rss <= 1 {
		t.Fatalf("over called with %d", rss)
	}
	if rss, peak := w.now(); rss <= 0 || peak < rss {
		t.Fatalf("now = %d, %d", rss, peak)
	}
	w.Stop()
}

func FuzzParseStatus(f *testing.F) {
	f.Add([]byte("VmHWM:\t   40960 kB\nVmRSS:\t   16384 kB\n"))
	f.Add([]byte("VmRSS:\n"))
	f.Add([]byte("VmRSS:  kB kB\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := parseStatus(data)
		if err != nil {
			if m != (procMem{}) {
				t.Fatalf("error %v with figures %+v", err, m)
			}
			return
		}
		if m.RSS < 0 || m.HWM < 0 || m.RSS > 1<<50 || m.HWM > 1<<50 {
			t.Fatalf("out of range: %+v", m)
		}
	})
}

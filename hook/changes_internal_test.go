package hook

import (
	"bytes"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

// TestChangeDeskWorksThroughItsLink: the change desk needs no MQTT
// server; it reaches the rest of the hook only through changeLink, the
// seam a fleet of brokers plugs into. With a link that finds the terminal
// nowhere, an operator's change is recorded and nothing is sent; once its
// deadline has passed, the sweep expires it in the key service and tells
// the link.
func TestChangeDeskWorksThroughItsLink(t *testing.T) {
	store, err := boltstore.Open(filepath.Join(t.TempDir(), "db"), boltstore.Options{MasterKey: bytes.Repeat([]byte{1}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	var mu sync.Mutex
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	svc, err := keysvc.New(keysvc.Options{Store: store, Now: clock, ChangeDeadline: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	const sn = "A00MS8011390002S"
	if _, err := svc.Register(ctx, keysvc.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120"}); err != nil {
		t.Fatal(err)
	}

	var events, sent, asked []string
	link := changeLink{
		online: func(s string) (termConn, bool) { asked = append(asked, s); return termConn{}, false },
		sendKey: func(c termConn, payload []byte) {
			sent = append(sent, c.s.sn)
		},
		endSession: func(termConn, string, packets.Code) { t.Error("endSession called") },
		revoke:     func(string, string) int { t.Error("revoke called"); return 0 },
		claim: func(string, uint32, codec.ID, time.Time) (bool, error) {
			t.Error("claim called")
			return false, nil
		},
		event: func(_ slog.Level, name string, _ ...any) { events = append(events, name) },
		crew:  newCrew(),
	}
	defer link.crew.stop()
	opts := DefaultOptions()
	opts.Registry, opts.Now = svc, clock
	m, err := newMetrics(prometheus.NewRegistry(), svc)
	if err != nil {
		t.Fatal(err)
	}
	d := newChangeDesk(opts, m, link)

	ch, err := d.start(ctx, sn, codec.WhatPwd, "")
	if err != nil {
		t.Fatal(err)
	}
	// Asked before the start and once more after it (a login in progress
	// may have registered its connection meanwhile).
	if ch.Delivered || len(sent) != 0 || len(asked) != 2 || asked[0] != sn || asked[1] != sn {
		t.Fatalf("offline terminal: delivered %v, sent %v, asked online for %v", ch.Delivered, sent, asked)
	}
	d.expireDue(ctx)
	if got, _ := svc.Get(ctx, sn); got.Pending == nil {
		t.Fatal("the change expired before its deadline")
	}
	mu.Lock()
	now = now.Add(time.Hour)
	mu.Unlock()
	d.expireDue(ctx)
	if got, _ := svc.Get(ctx, sn); got.Pending != nil {
		t.Fatal("the change is still pending after its deadline and the sweep")
	}
	if want := []string{"change_started", "change_expired"}; !slices.Equal(events, want) {
		t.Fatalf("events %v, want %v", events, want)
	}
}

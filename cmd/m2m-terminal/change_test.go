package main

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	m2mbroker "github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/syncbuf"
	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/keysvc"
)

// TestConnectPrintsChangeInOrder: 'm2m-terminal connect' prints a
// credential change as it happens, against a real m2mguard broker: the
// login, then its session key (also when a persistent session delivers the
// key at once); the change received (cfg), the ack sent,
// the commit (done); then the connection the platform closes, and the
// login again with the new values, which are current by then (no "pending
// new password" after the commit).
func TestConnectPrintsChangeInOrder(t *testing.T) {
	cfg := m2mbroker.Default()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.MQTT.TCP, cfg.MQTT.WS, cfg.Admin.Listen = "127.0.0.1:0", "", ""
	b, err := m2mbroker.Start(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	tm, err := b.Service().Register(context.Background(), keysvc.RegisterRequest{SN: "ORD1", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		t.Fatal(err)
	}
	creds := filepath.Join(t.TempDir(), "ord1.json")
	rec := &client.Record{Identity: tm.Identity(), Alg: tm.Alg, BrokerURL: "tcp://" + b.Addr("tcp"),
		Current: client.Credentials{Up: tm.Creds.Up, UpExp: tm.Creds.UpExp, Down: tm.Creds.Down, DownExp: tm.Creds.DownExp, BK: tm.Creds.BK, BKExp: tm.Creds.BKExp}}
	if err := client.NewFileStore(creds).Save(rec); err != nil {
		t.Fatal(err)
	}

	// As in the README's tour: a pub first leaves a persistent session
	// subscribed to the key topic, so the next login's session key can
	// arrive before the client has even seen its CONNACK handled.
	if code, out, errOut := runCLI("pub", "--creds", creds, "--session-key", "temp", "1"); code != exitOK {
		t.Fatalf("pub: exit %d\n%s%s", code, out, errOut)
	}

	ctx, cancel := context.WithCancel(context.Background())
	var out, errb syncbuf.Buffer
	exited := make(chan int, 1)
	go func() { exited <- run(ctx, []string{"connect", "--creds", creds, "--session-key"}, &out, &errb) }()
	defer func() {
		cancel()
		<-exited
	}()
	waitOut := func(what string, n int) {
		t.Helper()
		if !testwait.Until(15*time.Second, func() bool { return strings.Count(out.String(), what) >= n }) {
			t.Fatalf("no %q in the output:\n%s\nstderr: %s", what, out.String(), errb.String())
		}
	}
	waitOut("session-key", 1)
	if _, err := b.Hook().StartChange(context.Background(), "ORD1", codec.WhatAll); err != nil {
		t.Fatal(err)
	}
	waitOut("connected (reconnect)", 1)
	waitOut("session-key", 2)

	var kinds []string
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		f := strings.Fields(line) // "15:04:05  kind ..."
		if len(f) < 2 {
			t.Fatalf("line %q", line)
		}
		kind := strings.TrimSuffix(f[1], ":")
		if strings.Contains(line, "(reconnect)") {
			kind = "reconnected"
		}
		kinds = append(kinds, kind)
		if strings.Contains(line, "pending") && strings.Contains(out.String()[:strings.Index(out.String(), line)], "change-committed") {
			t.Errorf("%q after the commit", line)
		}
	}
	want := []string{"connected", "session-key", "change-received", "ack-sent", "change-committed", "connection-lost", "reconnected", "session-key"}
	if strings.Join(kinds, " ") != strings.Join(want, " ") {
		t.Fatalf("events in the order\n  %s\nwant\n  %s\noutput:\n%s", strings.Join(kinds, " "), strings.Join(want, " "), out.String())
	}
}

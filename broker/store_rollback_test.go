package broker_test

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	bolt "go.etcd.io/bbolt"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/syncbuf"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"

	"github.com/m2mguard/m2mguard/broker"
)

// connack sends a MQTT 3.1.1 CONNECT as terminal tm with its uplink
// password and returns the CONNACK return code (0 = accepted).
func connack(t *testing.T, addr string, tm *keysvc.Terminal) byte {
	t.Helper()
	var nonce [8]byte
	rand.Read(nonce[:])
	l := codec.Login{Identity: tm.Identity(), Alg: tm.Alg, TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(nonce[:]))}
	pw, err := l.Sign(tm.Creds.Up)
	if err != nil {
		t.Fatal(err)
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 600, ClientIdentifier: tm.SN,
			UsernameFlag: true, Username: []byte(tm.Identity().Username()), PasswordFlag: true, Password: pw}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, ack); err != nil {
		t.Fatalf("connack: %v", err)
	}
	if ack[0] != 0x20 {
		t.Fatalf("not a connack: % x", ack)
	}
	return ack[3]
}

// rawRecord reads (v != nil: writes) the stored bytes of a terminal with
// raw bbolt, as an attacker with write access to the file and no master
// key can.
func rawRecord(t *testing.T, path, sn string, v []byte) []byte {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("terminals"))
		if v != nil {
			return b.Put([]byte(sn), v)
		}
		v = bytes.Clone(b.Get([]byte(sn)))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestEmbeddedStoreRollbackRefused (SECURITY.md, attacks tried), on a live
// broker: a terminal is registered; its credentials leak, so the operator
// starts a change and disables it; while the broker is stopped, someone
// with write access to m2mguard.db (and without the master key) copies the
// record's old sealed bytes back. The broker must refuse to start, with an
// error that says what happened and what to do, instead of letting the
// terminal in with its leaked password.
func TestEmbeddedStoreRollbackRefused(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	cfg := testConfig(t)
	dbFile := filepath.Join(cfg.DataDir, "m2mguard.db")

	b, _ := start(t, cfg)
	leaked, err := b.Service().Register(ctx, keysvc.RegisterRequest{SN: "A1", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		t.Fatal(err)
	}
	other, err := b.Service().Register(ctx, keysvc.RegisterRequest{SN: "B1", IMEI: "354494040518588", IMSI: "460020084678138"})
	if err != nil {
		t.Fatal(err)
	}
	b.Close()
	old := rawRecord(t, dbFile, "A1", nil)

	b, _ = start(t, cfg)
	if _, err := b.Service().StartChange(ctx, "A1", keysvc.ChangeRequest{What: codec.WhatAll, Mode: codec.ModeCipher}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Service().SetStatus(ctx, "A1", keysvc.StatusDisabled); err != nil {
		t.Fatal(err)
	}
	if code := connack(t, b.Addr("tcp"), leaked); code == 0 {
		t.Fatal("the disabled terminal logged in before the rollback")
	}
	if code := connack(t, b.Addr("tcp"), other); code != 0 {
		t.Fatalf("the other terminal was refused: %#x", code)
	}
	b.Close()

	rawRecord(t, dbFile, "A1", old)

	logs := &syncbuf.Buffer{}
	b, err = broker.Start(ctx, cfg, slog.New(slog.NewTextHandler(logs, nil)))
	if err == nil {
		defer b.Close()
		code := connack(t, b.Addr("tcp"), leaked)
		t.Fatalf("the broker started on the rolled-back store; the disabled terminal's login with its leaked password got CONNACK code %#x (0 = accepted)", code)
	}
	if !errors.Is(err, boltstore.ErrTampered) {
		t.Fatalf("start: %v, want boltstore.ErrTampered", err)
	}
	for _, want := range []string{dbFile, "backup", "store.embedded.reseal"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the error does not mention %q: %v", want, err)
		}
	}
	t.Logf("refused to start: %v", err)

	// The way out, for an operator who has checked the records: the reseal
	// code from the error, once. The broker starts, says so at level ERROR,
	// and the store holds the records as they were accepted.
	var te *boltstore.TamperError
	if !errors.As(err, &te) {
		t.Fatalf("start: %v is not a *boltstore.TamperError", err)
	}
	resealed := *cfg
	resealed.Store.Embedded.Reseal = te.ResealCode
	b, logs = start(t, &resealed)
	if !strings.Contains(logs.String(), "level=ERROR") || !strings.Contains(logs.String(), "RESEALED") {
		t.Errorf("the reseal was not logged at level ERROR:\n%s", logs)
	}
	if tm, err := b.Service().Get(ctx, "A1"); err != nil || tm.Status != keysvc.StatusActive {
		t.Fatalf("after the reseal: %v, %v", tm, err)
	}
	b.Close()
	b, _ = start(t, cfg)
	b.Close()
}

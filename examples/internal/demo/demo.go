// Package demo is the walk-through the quickstart and vault examples share:
// a broker, a terminal from the client library and an application on paho;
// login, session key, encrypted data and a credential change.
package demo

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Run starts a broker on cfg and walks through the M2M1 life of one
// terminal, narrating on out. sn names the terminal (it is deleted first
// if it exists, so that the demo can run again on the same store).
func Run(ctx context.Context, cfg *broker.Config, sn string, out io.Writer) error {
	say := func(format string, a ...any) { fmt.Fprintf(out, format+"\n", a...) }
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	b, err := broker.Start(ctx, cfg, logger)
	if err != nil {
		return err
	}
	defer b.Close()
	say("broker on %s (store %s)", b.PublicURL(), cfg.Store.Type)

	// 1. Register a terminal (what `m2mctl terminal add` does) and an application.
	svc := b.Service()
	svc.Delete(ctx, sn)
	t, err := svc.Register(ctx, keysvc.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		return err
	}
	say("registered terminal %s (alg %s); its passwords and basic key go into the device", t.SN, t.Alg)
	if _, err := svc.AddApp(ctx, keysvc.AddAppRequest{Name: "dash", Password: []byte("dashboard-password")}); err != nil {
		return err
	}

	// 2. The application: any MQTT client, ClientID not a serial number.
	got := make(chan string, 16)
	app := paho.NewClient(paho.NewClientOptions().AddBroker(b.PublicURL()).SetClientID("dash-1").
		SetUsername("dash").SetPassword("dashboard-password").SetProtocolVersion(4))
	if tok := app.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("application connect: %v", tok.Error())
	}
	defer app.Disconnect(100)
	if tok := app.Subscribe("m2m/+/up/#", 1, func(_ paho.Client, m paho.Message) {
		got <- fmt.Sprintf("%s %s", m.Topic(), m.Payload())
	}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("application subscribe: %v", tok.Error())
	}
	say("application dash-1 subscribed to m2m/+/up/#")

	// 3. The terminal, with the credentials the factory wrote into it.
	events := make(chan client.Event, 64)
	rec := &client.Record{Identity: t.Identity(), Alg: t.Alg, Current: client.Credentials{
		Up: t.Creds.Up, UpExp: t.Creds.UpExp, Down: t.Creds.Down, DownExp: t.Creds.DownExp, BK: t.Creds.BK, BKExp: t.Creds.BKExp}}
	c, err := client.New(client.Config{
		Brokers: []string{b.PublicURL()}, Identity: rec.Identity, Alg: rec.Alg, Store: client.NewMemStore(rec),
		SessionKey: true, CleanSession: true,
		OnEvent: func(e client.Event) {
			select {
			case events <- e:
			default:
			}
		},
	})
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Connect(ctx); err != nil {
		return err
	}
	s := c.Session()
	say("terminal logged in (digest over sn, IMEI, IMSI, time and nonce); session key sid %s, until %s", s.SID, s.Exp.UTC().Format(time.RFC3339))

	publish := func(payload string) error {
		if err := c.Publish(ctx, "temp", []byte(payload), 1); err != nil {
			return err
		}
		say("terminal published %s in an AES-256-GCM envelope (seq %d)", payload, c.Session().UplinkSeq)
		select {
		case m := <-got:
			say("application received the plaintext: %s", m)
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := publish(`{"t":21.5}`); err != nil {
		return err
	}

	// 4. A credential change of the passwords and the basic key, in ciphertext.
	rid, err := c.RequestChange(ctx, codec.WhatAll, codec.ModeCipher)
	if err != nil {
		return err
	}
	say("terminal asked for new passwords and basic key: change %s, values sent wrapped under the old basic key", rid)
	for committed, reconnected := false, false; !committed || !reconnected; {
		select {
		case e := <-events:
			switch e.Kind {
			case client.EventChangeCommitted:
				committed = true
				say("change %s committed on both sides", e.RID)
			case client.EventConnected:
				if committed {
					reconnected = true
				}
			}
		case <-ctx.Done():
			return fmt.Errorf("waiting for the change: %w", ctx.Err())
		}
	}
	after, err := svc.Get(ctx, sn)
	if err != nil {
		return err
	}
	if string(after.Creds.Up) == string(t.Creds.Up) {
		return fmt.Errorf("the platform still holds the old password")
	}
	say("terminal logged in again with the new values; new session key sid %s", c.Session().SID)
	if err := publish(`{"t":21.7}`); err != nil {
		return err
	}
	say("done")
	return nil
}

// Package client is the reference M2M1 terminal (docs/SPEC.md sections 3 to 7)
// on the paho MQTT client (github.com/eclipse/paho.mqtt.golang, MQTT 3.1.1).
// Firmware teams start from it; the project's tests and benchmarks use it as
// the terminal.
//
// # Using it
//
//	c, err := client.New(client.Config{
//		Brokers:    []string{"ssl://broker.example:8883"},
//		Identity:   codec.Identity{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"},
//		Alg:        codec.HS256,
//		Store:      client.NewFileStore("/var/lib/m2m/creds.json"),
//		SessionKey: true,
//		OnData:     func(sub string, p []byte) { ... },
//		OnEvent:    func(e client.Event) { log.Print(e) },
//	})
//	err = c.Connect(ctx)   // *RefusedError (errors.Is ErrRefused) or ErrUnreachable
//	err = c.Publish(ctx, "temp", []byte(`{"t":21.5}`), 1)
//	rid, err := c.RequestChange(ctx, codec.WhatAll, codec.ModeCipher)
//	c.Close()
//
// # What it does on the wire
//
// Every connection attempt, paho's automatic reconnections included, gets a
// fresh password token (ts from Config.Now, nonce from Config.Rand) through
// paho's credentials provider. The protocol version is pinned to 3.1.1 so
// that paho never retries a refused CONNECT as 3.1 with the same nonce.
// With Config.SessionKey the login carries flag 01 and the bkd of the basic
// key. After every accepted login the client subscribes to $m2m/<sn>/key,
// then to m2m/<sn>/down/#.
//
// Every message on the key topic is parsed and its digest verified with the
// downlink password (the pending new one for done); what fails is dropped,
// counted (Dropped) and logged by reason, never by content. A session key
// (sk) is unwrapped with the basic key and used for the envelopes of that
// connection only: uplink seq starts at 1 per session, downlink envelopes go
// through a codec.Window and replays are dropped. Downlink data that arrives
// before the session's key message is held (up to 64 messages) until it;
// the platform sends what it queued for the session only after the key
// message (SPEC section 6), so only what is published in the moments
// between the CONNACK and the key message can arrive first.
// When the platform ends the session (at the key's exp) paho reconnects and
// the new login gets a new key. Outbound QoS 1/2 messages not acknowledged
// when a session ends are not resent in the next one (their envelopes are
// sealed under the old key): Publish then returns ErrSessionEnded.
//
// MQTT sessions persist (CleanSession false) unless Config.CleanSession is
// set: downlink data queued by the broker while the terminal is offline is
// delivered after the next login, encrypted by the platform for the new
// session.
//
// # Credential changes (SPEC section 7)
//
// RequestChange sends chg. The new values arrive in a cfg message (wrapped
// under the basic key) or, after acc, by SMS through Config.SMS (accepted
// only from Config.PlatformNumber and only while waiting for that rid).
// Either way — and the same for changes the platform starts — the client
// stores them as pending in the CredentialStore first, then sends ack signed
// with the new uplink password (bkd of the new basic key if it changes). On
// done, verified with the new downlink password, it commits in the store and
// logs in again with the new values.
//
// Nothing locks the terminal out: while a change is pending the store keeps
// both the current and the new values. A login tries the new password first
// (a login with it commits the change on the platform, which recovers a lost
// ack); if the broker refuses it the next attempt uses the current one, and
// so on alternately. If a new basic key is pending, the login carries its bkd
// (flag 01) so that the answer (sk under the new key, or bk-mismatch) tells
// whether the platform holds it. After every login with a change still
// pending the client sends its ack again: the platform answers done
// (commit), or unknown-rid (the change is gone: the pending values are
// discarded). Any downlink message that verifies only with the new
// downlink password proves the platform committed, and commits locally too.
//
// # Stores
//
// FileStore keeps the record in one JSON file, mode 0600, replaced
// atomically (temporary file, fsync, rename, fsync of the directory), so a
// power cut at any moment leaves either the old or the new file. Secrets are
// held as []byte and never logged. Besides the credentials the file may name
// the terminal's identity, alg and broker URL (Record.BrokerURL), which
// 'm2mctl terminal add --creds' writes and m2m-terminal dials.
//
// # The m2m-terminal command
//
// cmd/m2m-terminal wraps this package: connect, pub, sub, rotate, status.
// Its exit codes are 0 ok, 1 other failure, 2 usage error (a missing or
// damaged credential file too), 3 credentials refused by the broker
// (ErrRefused), 4 broker unreachable (ErrUnreachable).
package client

package client_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
)

var exampleID = codec.Identity{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"}

// A terminal's life: connect (a fresh login token on every attempt),
// publish, receive, change its credentials, close.
func Example() {
	c, err := client.New(client.Config{
		Brokers:    []string{"ssl://broker.example:8883"},
		Identity:   exampleID,
		Alg:        codec.HS256,
		Store:      client.NewFileStore("/var/lib/m2m/creds.json"),
		SessionKey: true,
		OnData:     func(sub string, p []byte) { log.Printf("downlink %s: %s", sub, p) },
		OnEvent:    func(e client.Event) { log.Print(e) },
	})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		log.Fatal(err) // errors.Is(err, client.ErrRefused) or client.ErrUnreachable
	}
	if err := c.Publish(ctx, "temp", []byte(`{"t":21.5}`), 1); err != nil {
		log.Fatal(err)
	}
	if _, err := c.RequestChange(ctx, codec.WhatAll, codec.ModeCipher); err != nil {
		log.Fatal(err)
	}
}

// The login token comes from Config.Now and Config.Rand: with the SPEC
// vectors' time and nonce, the client reproduces the vector.
func ExampleClient_LoginCredentials() {
	bk := bytes.Repeat([]byte{0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff}, 2)
	c, err := client.New(client.Config{
		Brokers:  []string{"tcp://127.0.0.1:1883"},
		Identity: exampleID,
		Alg:      codec.MD5,
		Store: client.NewMemStore(&client.Record{Current: client.Credentials{
			Up: []byte("vkwF2SJaQ7mXc4Lp"), UpExp: codec.Never, Down: []byte("Uo3aHCbGz8RtY2Nw"), DownExp: codec.Never,
			BK: bk, BKExp: codec.Never}}),
		Now:  func() time.Time { return time.Unix(1764316800, 0) },
		Rand: bytes.NewReader([]byte{0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef}),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	id, user, pw, err := c.LoginCredentials()
	fmt.Println(id, user, err)
	fmt.Println(pw)
	// Output:
	// A00MS8011390002S 354494040518570:460020084678120 <nil>
	// M2M1.md5.00.1764316800.0123456789abcdef..2f9e015e74f680cde951aed1a1bb8eb1
}

// A FileStore keeps the current values and, during a change, the pending
// ones; every update replaces the file atomically.
func ExampleFileStore() {
	dir, _ := os.MkdirTemp("", "m2m")
	defer os.RemoveAll(dir)
	fs := client.NewFileStore(filepath.Join(dir, "creds.json"))
	err := fs.Save(&client.Record{Identity: exampleID, Alg: codec.HS256, Current: client.Credentials{
		Up: []byte("vkwF2SJaQ7mXc4Lp"), UpExp: codec.Never, Down: []byte("Uo3aHCbGz8RtY2Nw"), DownExp: codec.Never}})
	if err != nil {
		log.Fatal(err)
	}
	newPwd := codec.Params{What: codec.WhatPwd, Up: []byte("N3wUpPassw0rdAAA"), UpExp: codec.Never,
		Down: []byte("N3wDownPassw0rdB"), DownExp: codec.Never}
	fs.SavePending(client.Pending{RID: 0x1111222233334444, Params: newPwd, Mode: codec.ModeCipher})
	rec, _ := fs.Load()
	fmt.Println(string(rec.Current.Up), rec.Pending.RID)
	fs.Commit(0x1111222233334444)
	rec, _ = fs.Load()
	fmt.Println(string(rec.Current.Up), rec.Pending == nil)
	st, _ := os.Stat(fs.Path())
	fmt.Println(st.Mode().Perm())
	// Output:
	// vkwF2SJaQ7mXc4Lp 1111222233334444
	// N3wUpPassw0rdAAA true
	// -rw-------
}

// Command embed adds the m2mguard hook to your own mochi-mqtt server: a key
// service on a store, the hook, your listeners. That is the whole
// integration; everything else in your server stays as it is.
//
//	go run ./examples/embed            # MQTT on 127.0.0.1:1883 until Ctrl-C
//
// Add no other auth or ACL hook (no auth.AllowHook): mochi ORs their
// answers, so an allow-all hook would open every door this one closes.
package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

func main() {
	addr := "127.0.0.1:1883"
	if len(os.Args) > 1 {
		addr = os.Args[1]
	}
	dir, _ := os.MkdirTemp("", "m2mguard-embed")
	defer os.RemoveAll(dir)
	key := make([]byte, boltstore.MasterKeySize) // in production: boltstore.LoadOrCreateMasterKey
	rand.Read(key)

	// The key service on a store (embedded here; vaultstore.Open for Vault).
	store, err := boltstore.Open(filepath.Join(dir, "m2mguard.db"), boltstore.Options{MasterKey: key})
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	svc, err := keysvc.New(keysvc.Options{Store: store})
	if err != nil {
		log.Fatal(err)
	}

	// Your mochi server: the inline client is required (the hook publishes
	// key messages through it). Then the hook, then your listeners.
	server := mqtt.New(&mqtt.Options{InlineClient: true})
	h, err := hook.New(hook.Options{Registry: svc, Server: server})
	if err != nil {
		log.Fatal(err)
	}
	if err := server.AddHook(h, nil); err != nil {
		log.Fatal(err)
	}
	if err := server.AddListener(listeners.NewTCP(listeners.Config{ID: "tcp", Address: addr})); err != nil {
		log.Fatal(err)
	}
	if err := server.Serve(); err != nil {
		log.Fatal(err)
	}

	// A terminal to log in with (normally registered through the admin API).
	t, err := svc.Register(context.Background(), keysvc.RegisterRequest{SN: "EMBED1", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("M2M1 broker on %s; terminal %s registered (alg %s). Ctrl-C to stop.\n", addr, t.SN, t.Alg)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	<-ctx.Done()
	server.Close() // the broker package uses internal/mochifix.Close to avoid mochi-mqtt/server#488
}

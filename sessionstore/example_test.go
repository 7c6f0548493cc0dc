package sessionstore_test

import (
	"log"
	"path/filepath"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/mochifix"
	"github.com/m2mguard/m2mguard/sessionstore"
)

// The session store in a mochi server with the M2M1 hook: added after the
// hook, opened with the broker's master key; Serve restores the sessions,
// and the server's close flushes and closes the store.
func Example() {
	dir := "./data"
	key, err := boltstore.LoadOrCreateMasterKey("", filepath.Join(dir, "master.key"))
	if err != nil {
		log.Fatal(err)
	}
	server := mqtt.New(&mqtt.Options{InlineClient: true})
	store, err := sessionstore.Open(filepath.Join(dir, "sessions.db"), sessionstore.Options{MasterKey: key, Server: server})
	if err != nil {
		log.Fatal(err)
	}
	// server.AddHook(m2mguardHook, nil), created with hook.Options{Storage: store, ...}
	if err := server.AddHook(store, nil); err != nil {
		log.Fatal(err)
	}
	// server.AddListener(...)
	if err := server.Serve(); err != nil {
		log.Fatal(err)
	}
	defer mochifix.Close(server, []string{"tcp"}, 10*time.Second)
}

package fleetlink_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"log"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/fleetlink"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
)

// A broker joins its fleet as broker.Start does it: the link is created
// before the key service and the hook (its OnWrite, Directory and
// ChangeBook go into their options), attached once both exist, and closed
// after the MQTT server and before the fleet. One embedded NATS node here;
// a fleet has three or more (README, "Fleet mode").
func Example() {
	quiet := slog.New(slog.DiscardHandler)
	dir, err := os.MkdirTemp("", "fleetlink-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	node, err := fleet.StartNode(fleet.NodeOptions{Name: "n1", StoreDir: filepath.Join(dir, "nats"), Logger: quiet})
	if err != nil {
		log.Fatal(err)
	}
	defer node.Shutdown()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f, err := fleet.Open(ctx, fleet.Options{URLs: []string{node.ClientURL()}, BrokerID: "broker-1", Logger: quiet})
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()

	link, err := fleetlink.New(ctx, fleetlink.Options{Fleet: f, Logger: quiet})
	if err != nil {
		log.Fatal(err)
	}
	defer link.Close() // before f.Close (defers run last first)

	key := make([]byte, boltstore.MasterKeySize)
	rand.Read(key)
	store, err := boltstore.Open(filepath.Join(dir, "m2mguard.db"), boltstore.Options{MasterKey: key})
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	svc, err := keysvc.New(keysvc.Options{Store: store, OnWrite: link.OnWrite}) // the other brokers drop their cached copy
	if err != nil {
		log.Fatal(err)
	}
	server := mqtt.New(&mqtt.Options{InlineClient: true, Logger: quiet})
	h, err := hook.New(hook.Options{Registry: svc, Server: server, Logger: quiet,
		ReplayGuard: f, Throttler: f.Throttler(hook.NewThrottleTable(hook.ThrottleOptions{})),
		Directory: link.Directory(), ChangeBook: link.ChangeBook()})
	if err != nil {
		log.Fatal(err)
	}
	defer h.Stop() // (mochi stops its hooks at Close)
	if err := link.Attach(h, svc); err != nil {
		log.Fatal(err)
	}

	// The admin API gets the fleet-wide sessions (admin.Options.Sessions).
	list, warnings := link.Sessions().FleetSessions(ctx)
	fmt.Println(len(list), "sessions,", len(warnings), "warnings")
	// Output: 0 sessions, 0 warnings
}

package fleet_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"time"

	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/hook"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// exampleFleet starts a single embedded node in a temporary directory and
// opens broker id's fleet on it; stop closes both.
func exampleFleet(id string) (f *fleet.Fleet, stop func()) {
	dir, err := os.MkdirTemp("", "fleet-example")
	if err != nil {
		log.Fatal(err)
	}
	node, err := fleet.StartNode(fleet.NodeOptions{Name: "n1", StoreDir: dir, Logger: quiet})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	f, err = fleet.Open(ctx, fleet.Options{URLs: []string{node.ClientURL()}, BrokerID: id, Logger: quiet})
	if err != nil {
		log.Fatal(err)
	}
	return f, func() {
		_ = f.Close()
		node.Shutdown()
		_ = os.RemoveAll(dir)
	}
}

// A node per broker: three brokers, each with its own embedded NATS node
// routed to the others', form one JetStream cluster and need no other
// service. One node here; a cluster lists every node's route URL in Routes
// and sets ClusterName, route credentials and, off loopback, TLS.
func ExampleStartNode() {
	dir, _ := os.MkdirTemp("", "fleet-example")
	defer os.RemoveAll(dir)
	node, err := fleet.StartNode(fleet.NodeOptions{
		Name:     "broker-1",
		StoreDir: dir,
		Users:    []fleet.NodeUser{{Name: "m2mguard", Password: []byte("from-a-secret-file")}},
		Logger:   quiet,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer node.Shutdown()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := node.WaitJetStream(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println(node.Name(), "ready")
	// Output: broker-1 ready
}

// The fleet is the hook's replay guard: a pair is accepted once in the
// whole fleet. Pass it as hook.Options.ReplayGuard.
func ExampleFleet_Claim() {
	f, stop := exampleFleet("broker-1")
	defer stop()
	ctx := context.Background()
	until := time.Now().Add(6 * time.Minute)
	first, _ := f.Claim(ctx, "A00MS8011390002S", 0x1234, until)
	again, _ := f.Claim(ctx, "A00MS8011390002S", 0x1234, until)
	fmt.Println(first, again)
	var _ hook.ReplayGuard = f
	// Output: true false
}

// The shared throttle wraps the hook's own table and goes in
// hook.Options.Throttler: failures on any broker count on every broker.
func ExampleFleet_Throttler() {
	f, stop := exampleFleet("broker-1")
	defer stop()
	th := f.Throttler(hook.NewThrottleTable(hook.ThrottleOptions{Free: 2}))
	now := time.Now()
	th.Fail("A00MS8011390002S", "203.0.113.7", now)
	th.Fail("A00MS8011390002S", "203.0.113.7", now)
	fmt.Println(th.Blocked("A00MS8011390002S", "203.0.113.7", now))
	// Output: true
}

// A broker registers each session once it is established and unregisters
// it, by epoch, when it ends; Watch tells it of logins elsewhere.
func ExampleDirectory() {
	f, stop := exampleFleet("broker-1")
	defer stop()
	ctx := context.Background()
	d := f.Directory()
	epoch, err := d.Register(ctx, fleet.Entry{ClientID: "A00MS8011390002S", Kind: fleet.KindTerminal, SN: "A00MS8011390002S", Protocol: 5, Since: time.Now()})
	if err != nil {
		log.Fatal(err)
	}
	e, ok, _ := d.Lookup(ctx, "A00MS8011390002S")
	fmt.Println(ok, e.Broker, e.Epoch == epoch)
	removed, _ := d.Unregister(ctx, "A00MS8011390002S", epoch)
	fmt.Println(removed)
	// Output:
	// true broker-1 true
	// true
}

// Events reach every subscribed broker, the publisher's own included; a
// subscriber that missed more than the stream holds gets an EventResync.
func ExampleBus() {
	f, stop := exampleFleet("broker-1")
	defer stop()
	got := make(chan fleet.Event, 1)
	if _, err := f.Bus().Subscribe(func(e fleet.Event) { got <- e }); err != nil {
		log.Fatal(err)
	}
	if err := f.Bus().Publish(context.Background(), fleet.Event{Kind: fleet.EventRevoke, SN: "A00MS8011390002S", Reason: "disabled"}); err != nil {
		log.Fatal(err)
	}
	e := <-got
	fmt.Println(e.Kind, e.SN, e.Origin, e.Origin == f.BrokerID())
	// Output: revoke A00MS8011390002S broker-1 true
}

// A broker serves methods to the others; Gather asks every live broker,
// for a fleet-wide session list.
func ExampleFleet_Gather() {
	f, stop := exampleFleet("broker-1")
	defer stop()
	if _, err := f.Handle("sessions", func(ctx context.Context, req []byte) ([]byte, error) {
		return []byte(`["A00MS8011390002S"]`), nil
	}); err != nil {
		log.Fatal(err)
	}
	replies, err := f.Gather(context.Background(), "sessions", nil)
	if err != nil {
		log.Fatal(err)
	}
	for _, r := range replies {
		fmt.Println(r.Broker, string(r.Data), r.Err)
	}
	// Output: broker-1 ["A00MS8011390002S"] <nil>
}

// Work that must run once per fleet runs on the holder of a lease.
func ExampleFleet_Lease() {
	f, stop := exampleFleet("broker-1")
	defer stop()
	gained := make(chan struct{})
	l, err := f.Lease("expiry-sweep", fleet.LeaseOptions{TTL: 3 * time.Second, OnGain: func() { close(gained) }})
	if err != nil {
		log.Fatal(err)
	}
	<-gained
	fmt.Println(l.Held())
	l.Stop()
	fmt.Println(l.Held())
	// Output:
	// true
	// false
}

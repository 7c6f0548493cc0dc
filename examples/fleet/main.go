// Command fleet runs a fleet of three m2mguard brokers on one machine: each
// broker runs an embedded NATS node, the three nodes are one JetStream
// cluster, and the brokers share one Vault (a dev server the example
// starts). A terminal is provisioned through broker1, logs in on broker2,
// and the session list asked of broker3 shows it on broker2; disabled
// through broker3, the terminal's session on broker2 ends at once and
// broker1 refuses it.
//
//	make vault                 # once: builds .bin/vault (about 12 minutes)
//	go run ./examples/fleet
//
// Everything listens on loopback, on free ports; data lives in a temporary
// directory removed at the end. README, "Fleet mode", explains the
// topology; the configuration below is what three broker config files
// would say.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/devvault"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := run(ctx, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "fleet example:", err)
		os.Exit(1)
	}
}

// run starts Vault and the three brokers, walks through the example,
// narrating on out, and stops everything.
func run(ctx context.Context, out io.Writer) error {
	say := func(format string, a ...any) { fmt.Fprintf(out, format+"\n", a...) }
	dir, err := os.MkdirTemp("", "m2mguard-fleet")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	bin, err := devvault.Binary()
	if err != nil {
		return err
	}
	v, err := devvault.Start(ctx, bin, devvault.Options{Dir: dir})
	if err != nil {
		return err
	}
	defer v.Stop()
	say("vault dev server on %s", v.Addr)

	// Three brokers. What differs between them: the broker id, the data
	// directory and the embedded node's route port; the routes list is the
	// same on every broker. Secrets (admin token, NATS passwords) are
	// random for the run.
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	var routes []string
	for _, p := range ports {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", p))
	}
	adminToken, natsPassword, routePassword := secret(), secret(), secret()
	cfgs := make([]*broker.Config, 3)
	for i := range cfgs {
		cfg := broker.Default()
		cfg.DataDir = filepath.Join(dir, fmt.Sprintf("broker%d", i+1))
		cfg.MQTT.TCP, cfg.MQTT.WS = "127.0.0.1:0", ""
		cfg.Admin.Listen, cfg.Admin.Token = "127.0.0.1:0", adminToken
		cfg.Store.Type = "vault" // fleet mode needs a store the brokers share
		cfg.Store.Vault.Address, cfg.Store.Vault.Token = v.Addr, v.Token

		c := &cfg.Cluster
		c.BrokerID = fmt.Sprintf("broker%d", i+1)
		c.EmbeddedNATS = true
		c.Embedded.Listen = "127.0.0.1:0" // the broker's own connection to its node
		c.Embedded.ClusterListen = fmt.Sprintf("127.0.0.1:%d", ports[i])
		c.Embedded.Routes = routes
		c.Embedded.RouteUser, c.Embedded.RoutePassword = "route", routePassword
		c.NATSUser, c.NATSPassword = "m2mguard", natsPassword
		cfgs[i] = cfg
	}
	brokers, err := startAll(ctx, cfgs)
	defer func() {
		for _, b := range brokers {
			if b != nil {
				b.Close()
			}
		}
	}()
	if err != nil {
		return err
	}
	apis := make([]*adminapi.Client, 3)
	for i, b := range brokers {
		if apis[i], err = adminapi.New("http://"+b.Addr("admin"), adminToken, nil); err != nil {
			return err
		}
		say("broker%d: MQTT on %s, admin API on %s, NATS routes on 127.0.0.1:%d", i+1, b.PublicURL(), b.Addr("admin"), ports[i])
	}

	// 1. Provision a terminal through broker1 (what `m2mctl terminal add`
	// does); the record lives in Vault, for every broker.
	const sn = "FLEETDEMO1"
	bundle, err := apis[0].Register(ctx, adminapi.RegisterRequest{SN: sn, IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		return err
	}
	say("registered terminal %s through broker1", sn)

	// 2. The terminal logs in on broker2.
	events := make(chan client.Event, 64)
	term, err := terminal(bundle, brokers[1].PublicURL(), events)
	if err != nil {
		return err
	}
	defer term.Close()
	if err := term.Connect(ctx); err != nil {
		return err
	}
	say("terminal %s logged in on broker2; session key sid %s", sn, term.Session().SID)

	// 3. The session list of the whole fleet, asked of broker3.
	list, err := apis[2].SessionList(ctx)
	if err != nil {
		return err
	}
	say("sessions of the fleet, asked of broker3:")
	for _, s := range list.Sessions {
		say("  %-12s %-8s on %s since %s", s.ClientID, s.Kind, s.Broker, s.Since.Format(time.TimeOnly))
	}
	for _, w := range list.Warnings {
		say("  warning: %s", w)
	}

	// 4. Disabled through broker3: broker2 ends the session before the
	// call returns, and no broker lets the terminal in.
	start := time.Now()
	if _, err := apis[2].DisableTerminal(ctx, sn); err != nil {
		return err
	}
	if err := waitFor(ctx, events, client.EventConnectionLost); err != nil {
		return err
	}
	say("disabled through broker3: the session on broker2 ended %v later", time.Since(start).Round(time.Millisecond))
	term.Close()
	if err := refused(brokers[0].PublicURL(), term); err != nil {
		return err
	}
	say("broker1 refuses the disabled terminal's login")
	say("done")
	return nil
}

// startAll starts the brokers together: each embedded NATS node waits for
// a majority of the cluster before the broker's Start returns.
func startAll(ctx context.Context, cfgs []*broker.Config) ([]*broker.Broker, error) {
	logger := slog.New(slog.DiscardHandler) // the brokers' logs: slog.NewTextHandler(os.Stderr, nil)
	brokers := make([]*broker.Broker, len(cfgs))
	errs := make([]error, len(cfgs))
	var wg sync.WaitGroup
	for i, cfg := range cfgs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			brokers[i], errs[i] = broker.Start(ctx, cfg, logger.With("broker", cfg.Cluster.BrokerID))
		}()
	}
	wg.Wait()
	return brokers, errors.Join(errs...)
}

// terminal is the device with the credentials of its provisioning bundle,
// connecting to url.
func terminal(b *adminapi.Bundle, url string, events chan<- client.Event) (*client.Client, error) {
	alg, err := codec.ParseAlg(b.Alg)
	if err != nil {
		return nil, err
	}
	bk, err := hex.DecodeString(b.BK)
	if err != nil {
		return nil, err
	}
	rec := &client.Record{Identity: codec.Identity{SN: b.SN, IMEI: b.IMEI, IMSI: b.IMSI}, Alg: alg,
		Current: client.Credentials{Up: []byte(b.Up), UpExp: b.UpExp, Down: []byte(b.Down), DownExp: b.DownExp, BK: bk, BKExp: b.BKExp}}
	return client.New(client.Config{
		Brokers: []string{url}, Identity: rec.Identity, Alg: alg, Store: client.NewMemStore(rec),
		SessionKey: true, CleanSession: true,
		OnEvent: func(e client.Event) {
			select {
			case events <- e:
			default:
			}
		},
	})
}

// refused checks that a fresh login of the terminal is refused at url.
func refused(url string, term *client.Client) error {
	id, user, pw, err := term.LoginCredentials()
	if err != nil {
		return err
	}
	c := paho.NewClient(paho.NewClientOptions().AddBroker(url).SetClientID(id).SetUsername(user).SetPassword(pw).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false))
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return errors.New("no CONNACK within 10 s")
	}
	if tok.Error() == nil {
		c.Disconnect(0)
		return errors.New("the disabled terminal logged in")
	}
	return nil
}

// waitFor waits for an event of kind.
func waitFor(ctx context.Context, events <-chan client.Event, kind client.EventKind) error {
	for {
		select {
		case e := <-events:
			if e.Kind == kind {
				return nil
			}
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", kind, ctx.Err())
		}
	}
}

// freePorts returns n free ports on loopback.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// secret returns a random password (26 base32 characters, 130 bits).
func secret() string { return rand.Text() }

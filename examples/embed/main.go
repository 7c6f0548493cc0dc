// Command embed adds the m2mguard hook to your own mochi-mqtt server — a key
// service on a store, the hook, your listeners — and shows the whole path
// once: it registers a terminal and an application, logs the terminal in
// with the client library (session key, sealed data) and the application
// with plain paho, and carries one reading from the terminal to the
// application. Then it serves until Ctrl-C and shuts down with
// mochifix.Close.
//
//	go run ./examples/embed                   # MQTT on 127.0.0.1:1883
//	go run ./examples/embed 127.0.0.1:11883   # another address
//
// Add no other auth or ACL hook (no auth.AllowHook): mochi ORs their
// answers, so an allow-all hook would open every door this one closes.
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/boltstore"
	"github.com/m2mguard/m2mguard/mochifix"
)

func main() {
	addr := "127.0.0.1:1883"
	if len(os.Args) > 1 {
		addr = os.Args[1]
	}
	// One logger, one format, for mochi, the hook and this program.
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, addr, logger, true); err != nil {
		logger.Error("embed failed", "err", err)
		os.Exit(1)
	}
}

// run starts the server on addr, walks one reading through it and, if
// serve is set, serves until ctx ends.
func run(ctx context.Context, addr string, logger *slog.Logger, serve bool) error {
	dir, err := os.MkdirTemp("", "m2mguard-embed")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	key := make([]byte, boltstore.MasterKeySize) // in production: boltstore.LoadOrCreateMasterKey
	rand.Read(key)

	// The key service on a store (embedded here; vaultstore.Open for Vault).
	store, err := boltstore.Open(filepath.Join(dir, "m2mguard.db"), boltstore.Options{MasterKey: key})
	if err != nil {
		return err
	}
	defer store.Close() // deferred calls run last first: the server is closed before the store
	svc, err := keysvc.New(keysvc.Options{Store: store})
	if err != nil {
		return err
	}

	// Your mochi server: the inline client is required (the hook publishes
	// key messages through it). Then the hook, then your listeners.
	server := mqtt.New(&mqtt.Options{InlineClient: true, Logger: logger.With("component", "mqtt")})
	h, err := hook.New(hook.Options{Registry: svc, Server: server, Logger: logger.With("component", "hook")})
	if err != nil {
		return err
	}
	if err := server.AddHook(h, nil); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	if err := server.AddListener(listeners.NewNet("tcp", ln)); err != nil {
		ln.Close()
		return err
	}
	if err := server.Serve(); err != nil {
		return err
	}
	// mochi's own Close can deadlock (mochi-mqtt/server#488).
	defer mochifix.Close(server, []string{"tcp"}, 10*time.Second)
	url := "tcp://" + ln.Addr().String()
	logger.Info("M2M1 broker listening", "url", url)

	// A terminal and an application (normally registered through the admin
	// API: m2mctl terminal add, m2mctl app add).
	t, err := svc.Register(ctx, keysvc.RegisterRequest{SN: "EMBED1", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		return err
	}
	if _, err := svc.AddApp(ctx, keysvc.AddAppRequest{Name: "dash", Password: []byte("dashboard-password")}); err != nil {
		return err
	}
	logger.Info("registered", "terminal", t.SN, "alg", t.Alg.String(), "application", "dash")

	// The application: any MQTT client; its ClientID is not a serial number.
	got := make(chan string, 1)
	app := paho.NewClient(paho.NewClientOptions().AddBroker(url).SetClientID("dash-1").
		SetUsername("dash").SetPassword("dashboard-password").SetProtocolVersion(4))
	if tok := app.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("application login: %v", tok.Error())
	}
	defer app.Disconnect(100)
	if tok := app.Subscribe("m2m/+/up/#", 1, func(_ paho.Client, m paho.Message) {
		select {
		case got <- fmt.Sprintf("%s %s", m.Topic(), m.Payload()):
		default:
		}
	}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("application subscribe: %v", tok.Error())
	}
	logger.Info("application logged in", "client_id", "dash-1", "subscribed", "m2m/+/up/#")

	// The terminal: the client library with the credentials of its
	// provisioning bundle (a client.FileStore in a real device).
	term, err := client.New(client.Config{
		Brokers: []string{url}, Identity: t.Identity(), Alg: t.Alg, SessionKey: true,
		Store: client.NewMemStore(&client.Record{Current: client.Credentials{
			Up: t.Creds.Up, UpExp: t.Creds.UpExp, Down: t.Creds.Down, DownExp: t.Creds.DownExp, BK: t.Creds.BK, BKExp: t.Creds.BKExp}}),
		Logger: logger.With("component", "terminal"),
	})
	if err != nil {
		return err
	}
	defer term.Close()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := term.Connect(cctx); err != nil {
		return fmt.Errorf("terminal login: %w", err)
	}
	if err := term.Publish(cctx, "temp", []byte(`{"t":21.5}`), 1); err != nil {
		return fmt.Errorf("terminal publish: %w", err)
	}
	logger.Info("terminal published", "topic", "m2m/EMBED1/up/temp", "sealed", term.Session().Encrypted)
	select {
	case m := <-got:
		logger.Info("application received the plaintext", "message", m)
	case <-cctx.Done():
		return errors.New("the application received nothing")
	}

	if serve {
		logger.Info("serving; Ctrl-C to stop")
		<-ctx.Done()
	}
	logger.Info("shutting down")
	return nil
}

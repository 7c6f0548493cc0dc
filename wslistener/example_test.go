package wslistener_test

import (
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/m2mguard/m2mguard/internal/mochifix"
	"github.com/m2mguard/m2mguard/netguard"
	"github.com/m2mguard/m2mguard/wslistener"
)

func Example() {
	server := mqtt.New(&mqtt.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	// server.AddHook(m2m1Hook, nil): the M2M1 hook, and no other auth hook.

	// Bind now, so that a taken port is an error here and port 0 works;
	// one Guard for all listeners, so that its limits hold for them all.
	guard := netguard.New(netguard.Options{MaxPerAddr: 64})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	ws := wslistener.New("ws", guard.Wrap(ln), wslistener.Options{ConnectTimeout: 10 * time.Second})
	if err := server.AddListener(ws); err != nil {
		panic(err)
	}
	if err := server.Serve(); err != nil {
		panic(err)
	}
	defer mochifix.Close(server, []string{"ws"}, 10*time.Second)

	fmt.Println(ws.Protocol(), strings.HasPrefix(ws.Address(), "127.0.0.1:")) // clients dial ws://<address>/mqtt
	// Output: ws true
}

package mochifix_test

import (
	"fmt"
	"log/slog"
	"net"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/m2mguard/m2mguard/mochifix"
)

// A mochi server shut down without the deadlock of its own Close.
func ExampleClose() {
	server := mqtt.New(&mqtt.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	if err := server.AddListener(listeners.NewNet("tcp", ln)); err != nil {
		panic(err)
	}
	if err := server.Serve(); err != nil {
		panic(err)
	}
	// ... the hook, clients, traffic ...
	err = mochifix.Close(server, []string{"tcp"}, 10*time.Second)
	fmt.Println("closed:", err)
	// Output: closed: <nil>
}

// Command quickstart runs m2mguard end to end in one process: a broker on
// the embedded store in a temporary directory, a terminal from the client
// library and an application on paho. It shows the login, the session key,
// encrypted data and a credential change.
//
//	go run ./examples/quickstart
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/examples/internal/demo"
)

func main() {
	dir, err := os.MkdirTemp("", "m2mguard-quickstart")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer os.RemoveAll(dir)

	cfg := broker.Default()
	cfg.DataDir = dir            // store, master key, admin token
	cfg.MQTT.TCP = "127.0.0.1:0" // any free port
	cfg.MQTT.WS, cfg.Admin.Listen = "", ""

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := demo.Run(ctx, cfg, "A00MS8011390002S", os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

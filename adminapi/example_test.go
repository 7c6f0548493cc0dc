package adminapi_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
)

// An operator's script: register a terminal, handle the errors an admin
// API answers with, list every terminal.
func Example() {
	base, token, stop := exampleBroker() // e.g. "http://127.0.0.1:8080" and the contents of data/admin.token
	defer stop()
	c, err := adminapi.New(base, token, &adminapi.Options{HTTPClient: &http.Client{Timeout: 30 * time.Second}})
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()

	b, err := c.Register(ctx, adminapi.RegisterRequest{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("registered", b.SN, "with", b.Alg, "; the device dials", strings.Split(b.BrokerURL, ":")[0])

	_, err = c.Register(ctx, adminapi.RegisterRequest{SN: "A00MS8011390002S", IMEI: "354494040518570", IMSI: "460020084678120"})
	var ae *adminapi.Error
	switch {
	case errors.Is(err, adminapi.ErrConflict) && errors.As(err, &ae):
		fmt.Println("again:", ae.Message, "- field", ae.Field)
	case errors.Is(err, adminapi.ErrUnreachable), errors.Is(err, adminapi.ErrNotAdminAPI):
		log.Fatal("check the address: ", err)
	case err != nil:
		log.Fatal(err)
	}

	for t, err := range c.AllTerminals(ctx, 0) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(t.SN, t.Status)
	}
	// Output:
	// registered A00MS8011390002S with hs256 ; the device dials tcp
	// again: terminal A00MS8011390002S already exists - field sn
	// A00MS8011390002S active
}

// exampleBroker starts a broker for the example and returns its admin
// API's URL and token, and a function that stops it.
func exampleBroker() (base, token string, stop func()) {
	dir, err := os.MkdirTemp("", "adminapi-example")
	if err != nil {
		log.Fatal(err)
	}
	b, base, err := start(filepath.Join(dir, "data"))
	if err != nil {
		log.Fatal(err)
	}
	return base, adminToken, func() {
		b.Close()
		os.RemoveAll(dir)
	}
}

package lastseen_test

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/m2mguard/m2mguard/lastseen"
)

func Example() {
	dir, _ := os.MkdirTemp("", "lastseen")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "lastseen.db")

	book, err := lastseen.Open(path, lastseen.Options{}) // flushes every 5 s
	if err != nil {
		panic(err)
	}
	// The hook records every accepted login.
	book.Seen("A00MS8011390002S", lastseen.Entry{
		At: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC), Remote: "192.0.2.7:50122", Protocol: 4, SessionKey: true,
	})
	book.Close() // writes what changed since the last flush

	again, _ := lastseen.Open(path, lastseen.Options{})
	defer again.Close()
	e, ok := again.Get("A00MS8011390002S")
	fmt.Println(ok, e.At.Format(time.RFC3339), e.Remote, e.Protocol, e.SessionKey)
	// Output: true 2025-03-01T12:00:00Z 192.0.2.7:50122 4 true
}

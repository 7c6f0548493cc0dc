package vaultstore_test

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/testwait"
	"github.com/m2mguard/m2mguard/internal/vaulttest"
	"github.com/m2mguard/m2mguard/keysvc"
	"github.com/m2mguard/m2mguard/keysvc/vaultstore"
)

// vaultMeter is a reverse proxy in front of the real Vault that counts the
// store's requests by kind (a LIST of the terminals, a GET or a PUT of a
// record), the bytes Vault answered to LISTs, and the most PUTs in flight
// at once.
type vaultMeter struct {
	addr string

	mu          sync.Mutex
	lists       int
	listBytes   int64
	gets, puts  int
	inFlight    int
	maxInFlight int
}

type countingBody struct {
	http.ResponseWriter
	n int64
}

func (c *countingBody) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

func startVaultMeter(t *testing.T, vaultAddr string) *vaultMeter {
	t.Helper()
	target, err := url.Parse(vaultAddr)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &vaultMeter{addr: "http://" + ln.Addr().String()}
	rp := httputil.NewSingleHostReverseProxy(target)
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		terminals := strings.Contains(r.URL.Path, "/m2mguard/terminals")
		list := terminals && (r.Method == "LIST" || r.URL.Query().Get("list") == "true")
		put := terminals && (r.Method == http.MethodPut || r.Method == http.MethodPost)
		m.mu.Lock()
		switch {
		case list:
			m.lists++
		case put:
			m.puts++
			m.inFlight++
			m.maxInFlight = max(m.maxInFlight, m.inFlight)
		case terminals && r.Method == http.MethodGet:
			m.gets++
		}
		m.mu.Unlock()
		cw := &countingBody{ResponseWriter: w}
		rp.ServeHTTP(cw, r)
		m.mu.Lock()
		if list {
			m.listBytes += cw.n
		}
		if put {
			m.inFlight--
		}
		m.mu.Unlock()
	})}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return m
}

// snapshot returns the counters and resets them.
func (m *vaultMeter) snapshot() (lists int, listBytes int64, gets, puts, maxInFlight int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	lists, listBytes, gets, puts, maxInFlight = m.lists, m.listBytes, m.gets, m.puts, m.maxInFlight
	m.lists, m.listBytes, m.gets, m.puts, m.maxInFlight = 0, 0, 0, 0, 0
	return
}

func measureN(t *testing.T, def int) int {
	if s := os.Getenv("M2MGUARD_MEASURE_N"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("M2MGUARD_MEASURE_N=%q", s)
		}
		return n
	}
	return def
}

// TestVaultInventoryAtScale is the regression test of the inventory at
// scale on Vault (README, the Vault inventory figures): it imports a fleet into the real dev Vault
// through a counting proxy, then pages through it as GET /v1/terminals does
// (keysvc.Service.List, 100 a page). An import must write concurrently
// (more than one PUT in flight, within the store's bound), and paging must
// not LIST the whole terminals path again for every page: the whole walk
// may LIST it at most once, so that a page costs its own GETs and nothing
// that grows with the fleet. It logs terminals/s of the import and the
// time per page. M2MGUARD_MEASURE_N sets the fleet size (default 1,500)
// and measures with the default ListCacheTTL:
//
//	M2MGUARD_MEASURE_N=5000 M2MGUARD_VAULT_BIN=$PWD/.bin/vault go test ./keysvc/vaultstore -run TestVaultInventoryAtScale -v
func TestVaultInventoryAtScale(t *testing.T) {
	if os.Getenv("M2MGUARD_MEASURE_N") == "" {
		t.Parallel() // the CI run asserts counts, not rates: it may share the machine
	}
	n := measureN(t, 1500)
	const page = 100
	v := vaulttest.Start(t)
	meter := startVaultMeter(t, v.Addr)
	// The listing is kept longer than any walk takes here, so that the
	// count does not depend on the machine's speed; the default (10 s)
	// LISTs once more for every 10 s a walk takes.
	ttl := time.Hour
	if os.Getenv("M2MGUARD_MEASURE_N") != "" {
		ttl = 0 // measure with the default
	}
	store, err := vaultstore.Open(t.Context(), vaultstore.Options{Address: meter.addr,
		Token: v.TokenWithPolicy(t, "m2mguard-broker", brokerPolicy(t)), Timeout: 10 * time.Second, ListCacheTTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	svc, err := keysvc.New(keysvc.Options{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()

	var csv strings.Builder
	csv.WriteString("sn,imei,imsi\n")
	for i := range n {
		fmt.Fprintf(&csv, "V%06d,354494040518570,460020084678120\n", i)
	}
	start := time.Now()
	rep, err := svc.Import(ctx, strings.NewReader(csv.String()), keysvc.ImportOptions{})
	took := time.Since(start)
	if err != nil || rep.Created != n {
		t.Fatalf("import: created %d of %d: %v", rep.Created, n, err)
	}
	_, _, _, puts, maxInFlight := meter.snapshot()
	t.Logf("import: %d terminals in %v: %.0f terminals/s; %d PUTs, at most %d in flight", n, took.Round(time.Millisecond), float64(n)/took.Seconds(), puts, maxInFlight)
	if maxInFlight < 2 {
		t.Errorf("the import wrote one record at a time (at most %d PUT in flight), want concurrent writes", maxInFlight)
	}

	after, pages, seen := "", 0, 0
	start = time.Now()
	for {
		ts, next, err := svc.List(ctx, after, page)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		seen += len(ts)
		if next == "" {
			break
		}
		after = next
	}
	took = time.Since(start)
	lists, listBytes, gets, _, _ := meter.snapshot()
	t.Logf("list: %d pages of %d in %v (%v a page): %d LISTs of the terminals path (%d bytes), %d GETs (%.1f Vault calls a page)",
		pages, page, took.Round(time.Millisecond), (took / time.Duration(pages)).Round(time.Microsecond), lists, listBytes, gets, float64(lists+gets)/float64(pages))
	if seen != n {
		t.Fatalf("listed %d terminals, want %d", seen, n)
	}
	if gets != n {
		t.Errorf("%d GETs for %d terminals, want one each", gets, n)
	}
	if lists > 1 && ttl != 0 {
		t.Errorf("%d LISTs of the whole terminals path (%d bytes) for %d pages: a page costs O(fleet)", lists, listBytes, pages)
	}
}

// TestListCache: this store's own creates and deletes show in the cached
// listing at once; another writer's (another broker, vault kv put) within
// the TTL; a cache of TTL < 0 is none.
func TestListCache(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	token := v.TokenWithPolicy(t, "m2mguard-broker", brokerPolicy(t))
	open := func(ttl time.Duration) *vaultstore.Store {
		s, err := vaultstore.Open(t.Context(), vaultstore.Options{Address: v.Addr, Token: token, ListCacheTTL: ttl})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	ctx := t.Context()
	cached, other, uncached := open(time.Hour), open(-1), open(-1)
	list := func(s *vaultstore.Store) string {
		t.Helper()
		keys, err := s.ListTerminals(ctx, "", 0)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Join(keys, ",")
	}
	for _, sn := range []string{"A1", "C3"} {
		if err := cached.CreateTerminal(ctx, newTerminal(sn)); err != nil {
			t.Fatal(err)
		}
	}
	if got := list(cached); got != "A1,C3" {
		t.Fatalf("listing %q", got)
	}
	if err := cached.CreateTerminal(ctx, newTerminal("B2")); err != nil {
		t.Fatal(err)
	}
	if err := cached.DeleteTerminal(ctx, "A1"); err != nil {
		t.Fatal(err)
	}
	if got := list(cached); got != "B2,C3" {
		t.Fatalf("after its own create and delete: %q, want B2,C3", got)
	}
	if keys, _ := cached.ListTerminals(ctx, "B2", 5); strings.Join(keys, ",") != "C3" {
		t.Fatalf("page after B2: %v", keys)
	}
	if err := other.CreateTerminal(ctx, newTerminal("D4")); err != nil {
		t.Fatal(err)
	}
	if got := list(cached); got != "B2,C3" {
		t.Fatalf("another writer's create within the TTL: %q (the cache was not used)", got)
	}
	if got := list(uncached); got != "B2,C3,D4" {
		t.Fatalf("without a cache: %q", got)
	}
	short := open(50 * time.Millisecond)
	list(short)
	if err := other.CreateTerminal(ctx, newTerminal("E5")); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "another writer's create after the TTL", func() bool { return list(short) == "B2,C3,D4,E5" })
}

// TestImportStopsWhenVaultFails: an import into a Vault that is gone stops
// with ErrUnavailable and stores nothing, rather than rejecting every row.
func TestImportStopsWhenVaultFails(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	store := openStore(t, v, v.Token)
	svc, err := keysvc.New(keysvc.Options{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	v.Stop()
	var csv strings.Builder
	csv.WriteString("sn,imei,imsi\n")
	for i := range 50 {
		fmt.Fprintf(&csv, "F%d,354494040518570,460020084678120\n", i)
	}
	rep, err := svc.Import(t.Context(), strings.NewReader(csv.String()), keysvc.ImportOptions{})
	if !errors.Is(err, keysvc.ErrUnavailable) || rep.Created != 0 || len(rep.Rejected) != 0 {
		t.Fatalf("import into a stopped Vault: %+v, %v; want no row rejected and ErrUnavailable", rep, err)
	}
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"

	"github.com/m2mguard/m2mguard/internal/stats"
)

// wsScenario: WebSocket connections (upgraded to the mqtt subprotocol)
// from one address that never send CONNECT. The broker must close each at
// its CONNECT deadline, and limit them per address as on TCP.
var wsScenario = &scenario{
	name: "ws",
	title: func(c *Config) string {
		return fmt.Sprintf("%d WebSocket connections from %s that never send CONNECT; broker CONNECT deadline %s; open ones counted %s after the deadline",
			c.WSConns, c.Attacker, c.ConnectTimeout, c.WSGrace)
	},
	attack: wsAttack,
}

type wsDetail struct {
	Conns          int              `json:"conns"`
	Accepted       int              `json:"accepted"`           // the upgrade was answered 101
	Failed         map[string]int64 `json:"failed,omitempty"`   // not upgraded, by what happened
	Deadline       float64          `json:"deadline_seconds"`   // the broker's CONNECT deadline
	CheckedAfter   float64          `json:"checked_after_secs"` // the count below, this long after the last upgrade
	OpenAtCheck    int              `json:"open_at_check"`
	ClosedByBroker int              `json:"closed_by_broker"` // of the accepted ones, before the check
	CloseAfter     stats.Latency    `json:"close_after"`      // upgrade to the broker's close, of those
}

// wsConn is one accepted connection, watched by a reader goroutine until
// the broker closes it.
type wsConn struct {
	conn     net.Conn
	upgraded time.Time
	closed   chan struct{} // closed when a read fails: the broker closed (or the suite did)
	closedAt time.Time     // when, once closed is closed
}

func wsAttack(ctx context.Context, e *env) (detail, error) {
	d := &wsDetail{Conns: e.cfg.WSConns, Deadline: e.cfg.ConnectTimeout.Seconds()}
	dialer := websocket.Dialer{
		NetDialContext:   e.attackDialer.DialContext,
		Subprotocols:     []string{"mqtt"},
		HandshakeTimeout: 10 * time.Second,
	}
	url := "ws://" + e.b.WS + "/mqtt"
	var (
		mu     sync.Mutex
		conns  []*wsConn
		failed = map[string]int64{}
		wg     sync.WaitGroup // the readers
	)
	defer func() {
		mu.Lock()
		for _, c := range conns {
			c.conn.Close()
		}
		mu.Unlock()
		wg.Wait()
	}()
	jobs := make(chan struct{})
	var dialers sync.WaitGroup
	for range 64 {
		dialers.Add(1)
		go func() {
			defer dialers.Done()
			for range jobs {
				ws, resp, err := dialer.DialContext(ctx, url, nil)
				if err != nil {
					if ended(ctx) {
						continue
					}
					mu.Lock()
					failed[wsFailure(resp, err)]++
					mu.Unlock()
					continue
				}
				c := &wsConn{conn: ws.NetConn(), upgraded: time.Now(), closed: make(chan struct{})}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
				wg.Add(1)
				go func() {
					defer wg.Done()
					// The broker sends nothing before a CONNECT: a read
					// returns when it closes the connection.
					io.Copy(io.Discard, c.conn)
					c.closedAt = time.Now()
					close(c.closed)
				}()
			}
		}()
	}
send:
	for range e.cfg.WSConns {
		select {
		case jobs <- struct{}{}:
		case <-ctx.Done():
			break send
		}
	}
	close(jobs)
	dialers.Wait()
	mu.Lock()
	d.Accepted, d.Failed = len(conns), failed
	var last time.Time // the last upgrade: every deadline has passed at last + the deadline
	for _, c := range conns {
		if c.upgraded.After(last) {
			last = c.upgraded
		}
	}
	if last.IsZero() {
		last = time.Now()
	}
	mu.Unlock()
	e.progress("%d upgraded, %d failed; counting open connections %s after the deadline", d.Accepted, d.Conns-d.Accepted, e.cfg.WSGrace)

	check := last.Add(e.cfg.ConnectTimeout + e.cfg.WSGrace)
	select {
	case <-time.After(time.Until(check)):
	case <-ctx.Done():
		return d, nil
	}
	d.CheckedAfter = time.Since(last).Seconds()
	var closeAfter []time.Duration
	mu.Lock()
	for _, c := range conns {
		select {
		case <-c.closed:
			d.ClosedByBroker++
			closeAfter = append(closeAfter, c.closedAt.Sub(c.upgraded))
		default:
			d.OpenAtCheck++
		}
	}
	mu.Unlock()
	d.CloseAfter = stats.Summarize(closeAfter)
	if len(d.Failed) == 0 {
		d.Failed = nil
	}
	return d, nil
}

// wsFailure names why a WebSocket dial failed.
func wsFailure(resp *http.Response, err error) string {
	switch {
	case resp != nil:
		return fmt.Sprintf("HTTP %d", resp.StatusCode)
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		return "closed"
	}
	return "error"
}

func (d *wsDetail) rows() []row {
	var fs []string
	for k, n := range d.Failed {
		fs = append(fs, fmt.Sprintf("%s %d", k, n))
	}
	sort.Strings(fs)
	failed := "none"
	if len(fs) > 0 {
		failed = strings.Join(fs, ", ")
	}
	return []row{
		{"connections", fmt.Sprintf("%d attempted, %d upgraded (101), not upgraded: %s", d.Conns, d.Accepted, failed)},
		{"after the CONNECT deadline", fmt.Sprintf("%.1f s after the last upgrade (deadline %.0f s): %d still open, %d closed by the broker",
			d.CheckedAfter, d.Deadline, d.OpenAtCheck, d.ClosedByBroker)},
		{"broker closed them after", closeText(d.CloseAfter)},
	}
}

func closeText(l stats.Latency) string {
	if l.N == 0 {
		return "none closed"
	}
	return fmt.Sprintf("p50 %.0f ms, max %.0f ms from the upgrade (%d connections)", l.P50, l.Max, l.N)
}

func (d *wsDetail) checks(*Result) []Check {
	return []Check{{What: "WebSocket connections without CONNECT still open after the deadline (+ grace)",
		Value: fmt.Sprintf("%d of %d upgraded", d.OpenAtCheck, d.Accepted), Target: "0", Met: d.OpenAtCheck == 0 && d.CheckedAfter > 0}}
}

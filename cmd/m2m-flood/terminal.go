package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"sort"
	"strings"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/stats"
)

// terminal is a terminal's identity and the secrets its logins need.
type terminal struct {
	id codec.Identity
	up []byte // uplink access password
	bk []byte // basic key
}

// The IMEI and IMSI of every terminal the suite registers or invents.
const (
	suiteIMEI = "354494040518570"
	suiteIMSI = "460020084678120"
)

// genuineSN is the terminal every scenario registers and logs in with.
const genuineSN = "GENUINE0001"

const alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// randomPassword returns 16 random characters of [A-Za-z0-9].
func randomPassword() []byte {
	p := make([]byte, 16)
	rand.Read(p)
	for i := range p {
		p[i] = alnum[int(p[i])%len(alnum)]
	}
	return p
}

// newTerminal returns a terminal with fresh random secrets.
func newTerminal(sn string) *terminal {
	bk := make([]byte, codec.BasicKeySize)
	rand.Read(bk)
	return &terminal{id: codec.Identity{SN: sn, IMEI: suiteIMEI, IMSI: suiteIMSI}, up: randomPassword(), bk: bk}
}

// login returns a fresh M2M1 login token (no session key), signed with the
// terminal's uplink password: the CONNECT password of a genuine login.
func (t *terminal) login() ([]byte, error) {
	var n [8]byte
	rand.Read(n[:])
	l := codec.Login{Identity: t.id, Alg: codec.HS256, TS: uint32(time.Now().Unix()), Nonce: codec.ID(binary.BigEndian.Uint64(n[:]))}
	return l.Sign(t.up)
}

// connect returns the CONNECT packet of a fresh login of t.
func (t *terminal) connect(keepalive uint16) (packets.Packet, error) {
	pw, err := t.login()
	if err != nil {
		return packets.Packet{}, err
	}
	return connectPacket(t.id.SN, t.id.Username(), pw, keepalive), nil
}

// LoginStats are the genuine terminal's logins while something else goes
// on: counts, failures by kind and the latency of the successful ones
// (from the dial to the CONNACK).
type LoginStats struct {
	Source   string         `json:"source"` // the address the logins came from
	Attempts int            `json:"attempts"`
	OK       int            `json:"ok"`
	Failures map[string]int `json:"failures,omitempty"` // by outcome (CONNACK code, "timeout", "closed", "dial")
	Latency  stats.Latency  `json:"latency"`
}

// String is the one-line summary of the tables.
func (s LoginStats) String() string {
	if s.Attempts == 0 {
		return "none"
	}
	out := fmt.Sprintf("%d of %d ok; p50 %.1f ms, p99 %.1f ms, max %.1f ms", s.OK, s.Attempts, s.Latency.P50, s.Latency.P99, s.Latency.Max)
	if len(s.Failures) > 0 {
		var fs []string
		for k, n := range s.Failures {
			fs = append(fs, fmt.Sprintf("%s %d", k, n))
		}
		sort.Strings(fs)
		out += "; failed: " + strings.Join(fs, ", ")
	}
	return out
}

// genuineLogin logs t in once from d and out again, and returns how long
// the dial, CONNECT and CONNACK took, or the outcome that was not a
// success.
func genuineLogin(ctx context.Context, d *net.Dialer, addr string, t *terminal, timeout time.Duration) (time.Duration, string) {
	pk, err := t.connect(60)
	if err != nil {
		return 0, "error"
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	c, err := dialMQTT(ctx, d, addr)
	if err != nil {
		if ended(ctx) {
			return 0, "timeout"
		}
		return 0, "dial"
	}
	stop := context.AfterFunc(ctx, func() { c.conn.Close() })
	defer stop()
	code, err := c.connect(pk, time.Until(start.Add(timeout)))
	took := time.Since(start)
	if err != nil && ended(ctx) {
		c.conn.Close()
		return 0, "timeout"
	}
	if err != nil || code != 0 {
		c.abort()
		return 0, outcomeOf(code, err)
	}
	c.disconnect()
	return took, ""
}

// probeLogins logs t in from d every interval (or as soon as the previous
// login ends, if it took longer) until ctx ends.
func probeLogins(ctx context.Context, d *net.Dialer, addr string, t *terminal, interval, timeout time.Duration) LoginStats {
	s := LoginStats{Failures: map[string]int{}}
	if d.LocalAddr != nil {
		s.Source = d.LocalAddr.(*net.TCPAddr).IP.String()
	}
	var lat []time.Duration
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for !ended(ctx) {
		took, failure := genuineLogin(ctx, d, addr, t, timeout)
		if ended(ctx) && failure != "" {
			break // cut short by the end of the phase, not the broker's doing
		}
		s.Attempts++
		if failure == "" {
			s.OK++
			lat = append(lat, took)
		} else {
			s.Failures[failure]++
		}
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
	s.Latency = stats.Summarize(lat)
	if len(s.Failures) == 0 {
		s.Failures = nil
	}
	return s
}

// loginSession logs the genuine terminal in from d with keepalive (0 =
// none) and returns the open session.
func loginSession(ctx context.Context, e *env, d *net.Dialer, keepalive uint16) (*mqttConn, error) {
	pk, err := e.genuine.connect(keepalive)
	if err != nil {
		return nil, err
	}
	c, err := dialMQTT(ctx, d, e.b.TCP)
	if err != nil {
		return nil, fmt.Errorf("login of %s: %w", e.genuine.id.SN, err)
	}
	code, err := c.connect(pk, e.cfg.LoginTimeout)
	if err != nil || code != 0 {
		c.abort()
		return nil, fmt.Errorf("login of %s: %s", e.genuine.id.SN, outcomeOf(code, err))
	}
	return c, nil
}

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
)

// wedgeScenario: a session of the genuine terminal (keepalive 0) subscribes
// to its key topic, stops reading and floods garbage control messages
// until its own writes block: the broker's answers have filled both socket
// buffers. Then the genuine terminal logs in again from its own address (a
// takeover of the session) and an operator disconnects the session through
// the admin API; both are timed, with a timeout.
var wedgeScenario = &scenario{
	name: "wedge",
	title: func(c *Config) string {
		return fmt.Sprintf("a session (keepalive 0) subscribed to its key topic stops reading and floods $m2m/<sn>/ctl (QoS 0/1) from %s until its writes block (at most %s); then a takeover login from %s and DELETE /v1/sessions/<sn>, each with a %s timeout",
			c.Attacker, c.Seconds, c.Genuine, c.WedgeTimeout)
	},
	attack: wedgeAttack,
}

// blockedAfter: a write that has not finished after this long means the
// broker has stopped reading.
const blockedAfter = 2 * time.Second

type wedgeDetail struct {
	Sent         int64     `json:"sent"` // garbage control messages written
	FloodSeconds float64   `json:"flood_seconds"`
	Blocked      bool      `json:"writes_blocked"`      // a write made no progress for blockedAfter
	Closed       bool      `json:"closed_during_flood"` // the broker closed the connection instead
	Takeover     timedCall `json:"takeover"`            // second login of the sn: dial to CONNACK
	TakeoverCode string    `json:"takeover_outcome"`    // 0x00, another CONNACK code, or what happened
	Disconnect   timedCall `json:"admin_disconnect"`    // DELETE /v1/sessions/<sn>
	SessionsLeft string    `json:"sessions_after"`      // GET /v1/sessions afterwards
	WedgedState  string    `json:"wedged_connection"`   // at the end: "still open" or "closed by the broker"
}

func wedgeAttack(ctx context.Context, e *env) (detail, error) {
	sn := e.genuine.id.SN
	w, err := loginSession(ctx, e, e.attackDialer, 0)
	if err != nil {
		return nil, err
	}
	defer w.abort()
	if err := w.write(subscribePacket(codec.KeyTopic(sn), 1), 5*time.Second); err != nil {
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	for {
		pk, err := w.read(5 * time.Second)
		if err != nil {
			return nil, fmt.Errorf("suback: %w", err)
		}
		if pk.FixedHeader.Type == packets.Suback {
			break
		}
	}
	batch, size, err := garbageBatch(codec.CtlTopic(sn), 64, true)
	if err != nil {
		return nil, err
	}

	d := &wedgeDetail{}
	start := time.Now()
	for ctx.Err() == nil && time.Since(start) < e.cfg.Seconds {
		w.conn.SetWriteDeadline(time.Now().Add(blockedAfter))
		n, err := w.conn.Write(batch)
		d.Sent += int64(n / size)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			d.Blocked = true
			break
		}
		if err != nil {
			d.Closed = true
			break
		}
	}
	d.FloodSeconds = time.Since(start).Seconds()
	e.progress("flood: %d messages in %.1f s; writes blocked: %v, closed by the broker: %v", d.Sent, d.FloodSeconds, d.Blocked, d.Closed)
	if ctx.Err() != nil {
		return d, nil
	}

	// The takeover: the genuine terminal logs in again, from its address.
	var taken *mqttConn
	taken, d.Takeover, d.TakeoverCode = timedLogin(ctx, e, e.cfg.WedgeTimeout)
	if taken != nil {
		defer taken.abort()
	}
	e.progress("takeover login: %s, %s", d.TakeoverCode, d.Takeover)
	d.Disconnect = e.admin.disconnect(ctx, sn, e.cfg.WedgeTimeout)
	e.progress("DELETE /v1/sessions/%s: %s", sn, d.Disconnect)

	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if ss, err := e.admin.sessions(sctx); err != nil {
		d.SessionsLeft = "unknown: " + err.Error()
	} else {
		d.SessionsLeft = fmt.Sprint(len(ss))
	}
	// Has the broker closed the wedged connection? (Asked of the kernel:
	// reading would unblock the broker's stuck writes.)
	if closed, err := w.peerClosed(); err != nil {
		d.WedgedState = "unknown: " + err.Error()
	} else if closed {
		d.WedgedState = "closed by the broker"
	} else {
		d.WedgedState = "still open"
	}
	return d, nil
}

// timedLogin logs the genuine terminal in from its address and returns the
// open session (nil unless accepted), the time from the dial to the CONNACK
// and the outcome.
func timedLogin(ctx context.Context, e *env, timeout time.Duration) (*mqttConn, timedCall, string) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	pk, err := e.genuine.connect(60)
	if err != nil {
		return nil, timedCall{Error: err.Error()}, "error"
	}
	start := time.Now()
	c, err := dialMQTT(ctx, e.genuineDialer, e.b.TCP)
	if err != nil {
		return nil, timedCall{MS: msSince(start), Error: err.Error(), TimedOut: ended(ctx)}, "dial"
	}
	stop := context.AfterFunc(ctx, func() { c.conn.Close() })
	code, err := c.connect(pk, timeout)
	call := timedCall{MS: msSince(start)}
	if !stop() || (err != nil && ended(ctx)) {
		c.abort()
		call.TimedOut = true
		return nil, call, "timeout"
	}
	if outcome := outcomeOf(code, err); outcome != "0x00" {
		c.abort()
		call.Error = outcome
		return nil, call, outcome
	}
	return c, call, "0x00"
}

func (d *wedgeDetail) rows() []row {
	flood := fmt.Sprintf("%d messages in %.1f s; ", d.Sent, d.FloodSeconds)
	switch {
	case d.Blocked:
		flood += fmt.Sprintf("then a write made no progress for %s: the broker stopped reading", blockedAfter)
	case d.Closed:
		flood += "then the broker closed the connection"
	default:
		flood += "writes never blocked"
	}
	return []row{
		{"flood", flood},
		{"takeover login (dial to CONNACK)", fmt.Sprintf("%s: %s", d.TakeoverCode, d.Takeover)},
		{"DELETE /v1/sessions/<sn>", d.Disconnect.String()},
		{"sessions listed afterwards", d.SessionsLeft},
		{"wedged connection at the end", d.WedgedState},
	}
}

func (d *wedgeDetail) checks(r *Result) []Check {
	tk := Check{What: "takeover login of the wedged terminal gets its CONNACK", Value: fmt.Sprintf("%s: %s", d.TakeoverCode, d.Takeover),
		Target: "0x00 within the timeout", Met: d.TakeoverCode == "0x00"}
	dc := Check{What: "admin DELETE /v1/sessions/<sn> answers", Value: d.Disconnect.String(), Target: "an answer within the timeout",
		Met: !d.Disconnect.TimedOut && d.Disconnect.Error == "" || d.Disconnect.Status == 404}
	return []Check{tk, dc}
}

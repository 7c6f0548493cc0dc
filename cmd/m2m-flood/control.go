package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/rawmqtt"
)

// controlScenario: a terminal with valid credentials logs in, never
// subscribes to its key topic and floods garbage control messages. Each is
// refused with an err message for a key topic nobody reads, and a security
// event.
var controlScenario = &scenario{
	name: "control",
	title: func(c *Config) string {
		return fmt.Sprintf("a logged-in terminal that never subscribes to its key topic floods garbage on $m2m/<sn>/ctl (QoS 0) from %s for %s",
			c.Attacker, c.Seconds)
	},
	attack: controlAttack,
}

// garbage is the payload of the floods' control messages: no M2M1
// control message, so each is refused.
var garbage = []byte("garbage, not an M2M1 control message")

// garbageBatch returns n encoded PUBLISH packets of garbage on topic,
// alternately QoS 0 and 1 if mixed, else all QoS 0, and the size of one.
func garbageBatch(topic string, n int, mixed bool) ([]byte, int, error) {
	var buf bytes.Buffer
	for i := range n {
		qos := byte(0)
		if mixed && i%2 == 1 {
			qos = 1
		}
		pk := publishPacket(topic, garbage, qos, uint16(i+1))
		if err := rawmqtt.Encode(&buf, &pk); err != nil {
			return nil, 0, err
		}
	}
	return buf.Bytes(), buf.Len() / n, nil
}

type controlDetail struct {
	Sent            int64   `json:"sent"` // garbage control messages written
	PerSec          float64 `json:"sent_per_sec"`
	Received        int64   `json:"received"` // packets from the broker
	Closed          bool    `json:"closed_by_broker"`
	ClosedAfter     float64 `json:"closed_after_seconds,omitempty"`
	SentBeforeClose int64   `json:"sent_before_close,omitempty"`
	Disconnect      string  `json:"disconnect_reason,omitempty"` // of the broker's DISCONNECT, if it sent one
}

func controlAttack(ctx context.Context, e *env) (detail, error) {
	ctx, cancel := context.WithTimeout(ctx, e.cfg.Seconds)
	defer cancel()
	c, err := loginSession(ctx, e, e.attackDialer, 60)
	if err != nil {
		return nil, err
	}
	batch, size, err := garbageBatch(codec.CtlTopic(e.genuine.id.SN), 64, false)
	if err != nil {
		return nil, err
	}
	d := &controlDetail{}
	var sent atomic.Int64
	var ending atomic.Bool // the suite closes the connection: not the broker's doing
	closed := make(chan struct{})
	var closeOnce sync.Once
	start := time.Now()
	brokerClosed := func() {
		closeOnce.Do(func() {
			d.Closed, d.ClosedAfter, d.SentBeforeClose = true, time.Since(start).Seconds(), sent.Load()
			close(closed)
		})
	}
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			pk, err := c.read(0)
			if err != nil {
				if !ending.Load() {
					brokerClosed()
				}
				return
			}
			d.Received++
			if pk.FixedHeader.Type == packets.Disconnect {
				d.Disconnect = fmt.Sprintf("0x%02x", pk.ReasonCode)
			}
		}
	}()
	stopProgress := startProgress(ctx, e, 5*time.Second, func() string { return fmt.Sprintf("%d garbage control messages sent", sent.Load()) })
	defer stopProgress()
	for ctx.Err() == nil {
		c.conn.SetWriteDeadline(time.Now().Add(time.Second))
		n, err := c.conn.Write(batch)
		sent.Add(int64(n / size))
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			brokerClosed()
		}
		select {
		case <-closed:
			cancel()
		default:
		}
	}
	elapsed := time.Since(start)
	ending.Store(true)
	c.abort()
	<-readerDone
	d.Sent = sent.Load()
	d.PerSec = float64(d.Sent) / elapsed.Seconds()
	return d, nil
}

func (d *controlDetail) rows() []row {
	closed := "no"
	if d.Closed {
		closed = fmt.Sprintf("yes, %.1f s into the attack, after %d messages", d.ClosedAfter, d.SentBeforeClose)
		if d.Disconnect != "" {
			closed += ", DISCONNECT " + d.Disconnect
		}
	}
	return []row{
		{"garbage control messages sent", fmt.Sprintf("%d (%.0f/s); %d packets received", d.Sent, d.PerSec, d.Received)},
		{"session closed by the broker", closed},
	}
}

func (d *controlDetail) checks(r *Result) []Check {
	return []Check{{What: "broker RSS growth (peak - before)", Value: fmt.Sprintf("%.1f MiB", r.RSS.Growth()), Target: "< 64 MiB", Met: r.RSS.Growth() < 64}}
}

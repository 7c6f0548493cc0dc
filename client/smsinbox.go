package client

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/m2mguard/m2mguard/sms"
)

// SMSInbox is the terminal's SMS bearer: the messages received on its
// MSISDN. A modem driver implements it on real hardware; GatewayInbox reads
// the project's test gateway (package sms/smstest).
type SMSInbox interface {
	// Next returns the oldest message with an ID greater than after,
	// waiting for one until ctx is done.
	Next(ctx context.Context, after int64) (sms.Message, error)
}

// GatewayInbox is an SMSInbox that polls an SMS gateway's
// GET {URL}/inbox/{MSISDN}?after={id} (the smstest API).
type GatewayInbox struct {
	URL    string // the gateway's base URL, e.g. http://127.0.0.1:8025
	MSISDN string // the terminal's number
	// Client is the HTTP client (default: one with a 10 s timeout).
	Client *http.Client
	// PollInterval is the wait between polls of an empty inbox (default
	// 500 ms).
	PollInterval time.Duration
}

// Next implements SMSInbox.
func (g *GatewayInbox) Next(ctx context.Context, after int64) (sms.Message, error) {
	hc := g.Client
	if hc == nil {
		hc = &http.Client{Timeout: 10 * time.Second}
	}
	poll := g.PollInterval
	if poll <= 0 {
		poll = 500 * time.Millisecond
	}
	u := strings.TrimRight(g.URL, "/") + "/inbox/" + url.PathEscape(g.MSISDN) + "?after=" + strconv.FormatInt(after, 10)
	for {
		msgs, err := g.fetch(ctx, hc, u)
		if err != nil {
			return sms.Message{}, err
		}
		for _, m := range msgs {
			if m.ID > after {
				return m, nil
			}
		}
		t := time.NewTimer(poll)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return sms.Message{}, ctx.Err()
		}
	}
}

func (g *GatewayInbox) fetch(ctx context.Context, hc *http.Client, u string) ([]sms.Message, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("client: SMS inbox: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("client: SMS inbox: HTTP %d", resp.StatusCode)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("client: SMS inbox: %w", err)
	}
	return sms.DecodeMessages(data)
}

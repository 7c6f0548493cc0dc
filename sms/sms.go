// Package sms is the SMS bearer of M2M1 credential changes (docs/SPEC.md section
// 7): the platform sends the new values in plaintext to the terminal's
// MSISDN through an SMS gateway. It defines the Message a gateway carries,
// the Sender the platform uses, and HTTPSender, a Sender for gateways with a
// small JSON-over-HTTP API. Package smstest is such a gateway, for tests and
// demos.
//
// The text of an SMS is a secret (it carries new passwords and keys): no
// code in this package logs it or puts it into an error.
package sms

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"
)

// Message is one SMS as a gateway reports it.
type Message struct {
	ID   int64     `json:"id"`   // increasing per gateway; inboxes are read "after" an ID
	To   string    `json:"to"`   // the receiving MSISDN
	From string    `json:"from"` // the sending number
	Text string    `json:"text"`
	At   time.Time `json:"at"`
}

// Sender sends an SMS.
type Sender interface {
	// Send sends text to the MSISDN to. A nil error means the gateway
	// accepted the message.
	Send(ctx context.Context, to, text string) error
}

// HTTPSender sends an SMS by POSTing {"to": ..., "text": ...} as JSON to
// URL. Any 2xx answer is success; other answers and transport errors are
// retried with exponential back-off (5xx, 429 and transport errors only;
// other 4xx fail at once).
type HTTPSender struct {
	// URL is the gateway's send endpoint, e.g. http://gw:8080/send.
	URL string
	// AuthHeader and AuthValue, if set, are sent as a request header
	// (e.g. "Authorization", "Bearer ...").
	AuthHeader, AuthValue string
	// Client is the HTTP client (default: one with Timeout).
	Client *http.Client
	// Timeout bounds each attempt (default 10 s).
	Timeout time.Duration
	// Retries is how many times a failed attempt is retried (default 0:
	// no retry; negative is treated as 0).
	Retries int
	// Backoff is the wait before the first retry, doubled for each next
	// one (default 200 ms), capped at MaxBackoff (default 5 s).
	Backoff, MaxBackoff time.Duration
	// Sleep waits between attempts (default: a timer that honours ctx);
	// tests replace it to avoid real waits.
	Sleep func(ctx context.Context, d time.Duration) error
}

// StatusError is a non-2xx answer of the gateway.
type StatusError struct {
	Code int
}

// Error names the HTTP status (never the text of the SMS).
func (e *StatusError) Error() string { return fmt.Sprintf("sms: gateway answered HTTP %d", e.Code) }

// ErrNoURL is returned by Send when HTTPSender.URL is empty.
var ErrNoURL = errors.New("sms: no gateway URL")

// Send implements Sender.
func (s *HTTPSender) Send(ctx context.Context, to, text string) error {
	if s.URL == "" {
		return ErrNoURL
	}
	body, err := json.Marshal(struct {
		To   string `json:"to"`
		Text string `json:"text"`
	}{to, text})
	if err != nil {
		return err
	}
	defer clear(body)
	timeout := s.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	hc := s.Client
	if hc == nil {
		hc = &http.Client{Timeout: timeout}
	}
	backoff, maxBackoff := s.Backoff, s.MaxBackoff
	if backoff <= 0 {
		backoff = 200 * time.Millisecond
	}
	if maxBackoff <= 0 {
		maxBackoff = 5 * time.Second
	}
	sleep := s.Sleep
	if sleep == nil {
		sleep = sleepCtx
	}
	retries := max(s.Retries, 0)
	for attempt := 0; ; attempt++ {
		err = s.attempt(ctx, hc, timeout, body)
		if err == nil {
			return nil
		}
		var se *StatusError
		retryable := !errors.As(err, &se) || se.Code >= 500 || se.Code == http.StatusTooManyRequests
		if !retryable || attempt >= retries || ctx.Err() != nil {
			return err
		}
		if serr := sleep(ctx, backoff); serr != nil {
			return err
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

func (s *HTTPSender) attempt(ctx context.Context, hc *http.Client, timeout time.Duration, body []byte) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.URL, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("sms: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	if s.AuthHeader != "" {
		req.Header.Set(s.AuthHeader, s.AuthValue)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("sms: sending: %w", err)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return &StatusError{Code: resp.StatusCode}
	}
	return nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// DecodeMessages parses a gateway inbox answer: a JSON array of Message.
// It refuses anything else (unknown fields, trailing data).
func DecodeMessages(data []byte) ([]Message, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var ms []Message
	if err := dec.Decode(&ms); err != nil {
		return nil, fmt.Errorf("sms: inbox: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("sms: inbox: trailing data")
	}
	return ms, nil
}

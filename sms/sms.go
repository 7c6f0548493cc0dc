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
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-retryablehttp"
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
// URL. Any 2xx answer is success. Transport errors, 429 and 5xx answers
// (but 501) are retried, up to Retries times, by hashicorp/go-retryablehttp
// with this package's policy:
//
//   - a 429 or 503 with a Retry-After header (delay-seconds or an HTTP
//     date) is retried no sooner than the gateway asked, plus up to a tenth
//     of that as jitter; a Retry-After beyond MaxRetryAfter, or one that
//     would end after ctx's deadline, ends the send at once with a
//     *StatusError carrying it (the caller retries later);
//   - any other retry waits a random time in [d/2, d], d = Backoff doubled
//     per retry up to MaxBackoff ("equal jitter": senders that failed
//     together do not retry together, and no wait exceeds MaxBackoff);
//   - other answers (4xx) fail at once, without a retry.
//
// Each attempt is bounded by Timeout. The request body carries the new
// credentials: it is never logged, neither here nor by the retry library
// (its logger is off), and no error carries it or the URL's query.
type HTTPSender struct {
	// URL is the gateway's send endpoint, e.g. http://gw:8080/send.
	URL string
	// AuthHeader and AuthValue, if set, are sent as a request header
	// (e.g. "Authorization", "Bearer ...").
	AuthHeader, AuthValue string
	// Client is the HTTP client (default: one on http.DefaultTransport).
	// Its Timeout is replaced by Timeout.
	Client *http.Client
	// Timeout bounds each attempt (default 10 s).
	Timeout time.Duration
	// Retries is how many times a failed attempt is retried (default 0:
	// no retry; negative is treated as 0).
	Retries int
	// Backoff is the longest wait before the first retry, doubled for each
	// next one (default 200 ms), capped at MaxBackoff (default 5 s); the
	// actual wait is random in its upper half.
	Backoff, MaxBackoff time.Duration
	// MaxRetryAfter is the longest Retry-After honoured (default 1 min);
	// a gateway asking for more ends the send at once.
	MaxRetryAfter time.Duration
	// Observer, if set, is told of every send and retry
	// (smsmetrics.Metrics counts them in Prometheus).
	Observer Observer
	// Logger, if set, gets one debug line per retry: attempt, HTTP status
	// or error kind, wait. Never the text, the number or the URL's query.
	Logger *slog.Logger
}

// Results of a send, as an Observer hears them (and the values of
// m2mguard_sms_sends_total{result}).
const (
	ResultSent     = "sent"     // the gateway accepted the message (2xx)
	ResultRejected = "rejected" // an answer not worth a retry (4xx but 429): configuration, credentials, number
	ResultFailed   = "failed"   // retries used up, a Retry-After too long to wait, a transport error or the caller's deadline
)

// Observer hears of every send of an HTTPSender and of every retry.
type Observer interface {
	Sent(result string, d time.Duration)
	Retried()
}

// StatusError is a non-2xx answer of the gateway.
type StatusError struct {
	Code int
	// RetryAfter is the wait the gateway asked for (Retry-After) in its
	// last answer, which the send did not wait for (it was too long for the
	// send, or no retry was left); 0 without one. A caller that tries again
	// later should wait at least that long.
	RetryAfter time.Duration
}

// Error names the HTTP status (never the text of the SMS).
func (e *StatusError) Error() string {
	if e.RetryAfter > 0 {
		return fmt.Sprintf("sms: gateway answered HTTP %d, retry after %v", e.Code, e.RetryAfter)
	}
	return fmt.Sprintf("sms: gateway answered HTTP %d", e.Code)
}

// ErrNoURL is returned by Send when HTTPSender.URL is empty.
var ErrNoURL = errors.New("sms: no gateway URL")

// Defaults of HTTPSender's zero fields.
const (
	DefaultTimeout       = 10 * time.Second
	DefaultBackoff       = 200 * time.Millisecond
	DefaultMaxBackoff    = 5 * time.Second
	DefaultMaxRetryAfter = time.Minute
)

// Send implements Sender.
func (s *HTTPSender) Send(ctx context.Context, to, text string) error {
	if s.URL == "" {
		return ErrNoURL
	}
	u, err := url.Parse(s.URL)
	if err != nil {
		return fmt.Errorf("sms: gateway URL does not parse")
	}
	where := u.Scheme + "://" + u.Host + u.Path // never the query: it may hold a key
	body, err := json.Marshal(struct {
		To   string `json:"to"`
		Text string `json:"text"`
	}{to, text})
	if err != nil {
		return err
	}
	defer clear(body)

	start := time.Now()
	result := ResultFailed
	if s.Observer != nil {
		defer func() { s.Observer.Sent(result, time.Since(start)) }()
	}

	req, err := retryablehttp.NewRequestWithContext(ctx, http.MethodPost, s.URL, body)
	if err != nil {
		return fmt.Errorf("sms: request to %s cannot be built", where) // its error would carry the URL
	}
	req.Header.Set("Content-Type", "application/json")
	if s.AuthHeader != "" {
		req.Header.Set(s.AuthHeader, s.AuthValue)
	}
	p := &retryPolicy{s: s, retries: max(s.Retries, 0), backoff: orDefault(s.Backoff, DefaultBackoff),
		maxBackoff: orDefault(s.MaxBackoff, DefaultMaxBackoff), maxRetryAfter: orDefault(s.MaxRetryAfter, DefaultMaxRetryAfter)}
	hc := http.Client{}
	if s.Client != nil {
		hc = *s.Client
	}
	hc.Timeout = orDefault(s.Timeout, DefaultTimeout)
	rc := &retryablehttp.Client{
		HTTPClient:   &hc,
		Logger:       nil, // the library logs URLs and errors; we log ourselves
		RetryMax:     p.retries,
		CheckRetry:   p.checkRetry,
		Backoff:      p.wait,
		ErrorHandler: retryablehttp.PassthroughErrorHandler,
	}
	resp, err := rc.Do(req)
	if resp != nil {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if resp.StatusCode >= 200 && resp.StatusCode <= 299 {
			result = ResultSent
			return nil
		}
		if !retryable(resp.StatusCode) {
			result = ResultRejected
		}
		return &StatusError{Code: resp.StatusCode, RetryAfter: p.retryAfter}
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err // its text names the whole URL
	}
	return fmt.Errorf("sms: sending to %s: %w", where, err)
}

// retryable reports whether an answer is worth another attempt: 429 and
// 5xx but 501, as retryablehttp's policy says.
func retryable(code int) bool {
	return code == http.StatusTooManyRequests || code >= 500 && code != http.StatusNotImplemented || code == 0
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// retryPolicy is the state of one Send's retries: checkRetry decides
// whether and how long to wait, wait hands that to the library.
type retryPolicy struct {
	s                                  *HTTPSender
	retries                            int
	backoff, maxBackoff, maxRetryAfter time.Duration
	attempt                            int           // attempts made
	next                               time.Duration // the wait checkRetry chose
	retryAfter                         time.Duration // the last answer's Retry-After, not waited for
}

func (p *retryPolicy) checkRetry(ctx context.Context, resp *http.Response, err error) (bool, error) {
	p.attempt++
	retry, perr := retryablehttp.DefaultRetryPolicy(ctx, resp, err)
	ra, hasRA := retryAfter(resp)
	p.retryAfter = ra // until a retry waits for it
	if !retry || p.attempt > p.retries {
		return false, perr
	}
	if hasRA {
		if ra > p.maxRetryAfter {
			return false, nil
		}
		p.next = ra + randUpTo(ra/10)
	} else {
		p.next = Backoff(p.backoff, p.maxBackoff, p.attempt-1)
	}
	if deadline, ok := ctx.Deadline(); ok && time.Now().Add(p.next).After(deadline) {
		return false, nil
	}
	p.retryAfter = 0 // waited for
	if p.s.Observer != nil {
		p.s.Observer.Retried()
	}
	if p.s.Logger != nil {
		what := "error"
		if resp != nil {
			what = strconv.Itoa(resp.StatusCode)
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			what = "timeout"
		}
		p.s.Logger.Debug("sms gateway attempt failed; retrying", "attempt", p.attempt, "answer", what, "wait", p.next)
	}
	return true, nil
}

func (p *retryPolicy) wait(_, _ time.Duration, _ int, _ *http.Response) time.Duration { return p.next }

// Backoff is the wait before retry n (0 for the first) of a failure without
// Retry-After: random in [d/2, d] with d = base·2ⁿ, at most limit.
func Backoff(base, limit time.Duration, n int) time.Duration {
	d := limit
	if n < 62 && base<<n > 0 && base<<n < limit {
		d = base << n
	}
	return d/2 + randUpTo(d/2)
}

func randUpTo(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return rand.N(d + 1)
}

// retryAfter returns the Retry-After of a 429 or 503 answer: delay-seconds
// or an HTTP date (a date in the past is 0).
func retryAfter(resp *http.Response) (time.Duration, bool) {
	if resp == nil || resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusServiceUnavailable {
		return 0, false
	}
	v := strings.TrimSpace(resp.Header.Get("Retry-After"))
	if v == "" {
		return 0, false
	}
	if secs, err := strconv.ParseUint(v, 10, 32); err == nil {
		return time.Duration(secs) * time.Second, true
	}
	at, err := http.ParseTime(v)
	if err != nil {
		return 0, false
	}
	return max(time.Until(at), 0), true
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

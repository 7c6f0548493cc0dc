package events

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-retryablehttp"
)

// Defaults of the Webhook's zero fields.
const (
	DefaultWebhookBatch    = 100
	DefaultWebhookInterval = time.Second
	DefaultWebhookTimeout  = 10 * time.Second
	DefaultWebhookRetries  = 5
	DefaultWebhookQueue    = 10000
)

// Batch is the body of a webhook POST: the events in the order they
// happened, at most Webhook.Batch of them.
type Batch struct {
	V      int     `json:"v"` // Version
	Events []Event `json:"events"`
}

// Webhook POSTs events as JSON batches (Batch) to URL. Emit never blocks:
// events wait in a queue of at most Queue (further ones are dropped and
// counted), one goroutine collects them into batches of at most Batch,
// sent once full or Interval after their first event, one POST at a time,
// in order. A POST that fails (transport error, 429, 5xx but 501) is
// retried up to Retries times by hashicorp/go-retryablehttp, waiting
// between 500 ms and 30 s with exponential back-off, or what a 429 or 503
// asks for in Retry-After; a batch that still fails, or that the receiver
// refuses (4xx), is dropped and counted. Any 2xx answer is success.
//
// Nothing is logged but the outcome of a failed POST (HTTP status or
// error kind, how many events): never a body, a header value or the URL's
// query, which may hold a key.
//
// Start starts the goroutine; Close stops it and waits for it.
type Webhook struct {
	// URL receives the POSTs (http:// or https://). Required.
	URL string
	// AuthHeader and AuthValue, if set, are sent with every POST (e.g.
	// "Authorization", "Bearer ...").
	AuthHeader, AuthValue string
	// Client is the HTTP client (default: one on http.DefaultTransport);
	// its Timeout is replaced by Timeout.
	Client *http.Client
	// Timeout bounds each attempt; 0 = DefaultWebhookTimeout.
	Timeout time.Duration
	// Retries of a failed POST; 0 = DefaultWebhookRetries, negative = none.
	Retries int
	// Batch is the most events per POST; 0 = DefaultWebhookBatch.
	Batch int
	// Interval is the longest an event waits for its batch to fill; 0 =
	// DefaultWebhookInterval.
	Interval time.Duration
	// Queue is how many events may wait; 0 = DefaultWebhookQueue.
	Queue int
	// Logger gets one warning per batch dropped; nil = slog.Default().
	Logger *slog.Logger

	ch     chan Event
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	start  sync.Once
	stop   sync.Once
	closed atomic.Bool

	sent, failed, dropped atomic.Uint64
	posts, retries        atomic.Uint64
}

// WebhookStats are a Webhook's counters since it started.
type WebhookStats struct {
	Sent    uint64 // events delivered (in POSTs answered 2xx)
	Failed  uint64 // events in batches dropped after their retries, or refused (4xx)
	Dropped uint64 // events dropped because the queue was full (or closed)
	Posts   uint64 // POSTs that ended (delivered or given up), retries not counted
	Retries uint64 // retried attempts
}

// ErrWebhookURL is returned by Start when the URL is not http(s).
var ErrWebhookURL = errors.New("events: webhook URL: want http:// or https://")

// Start checks the URL, fills in the defaults and starts the goroutine.
// It must be called once before Emit.
func (w *Webhook) Start() error {
	u, err := url.Parse(w.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return ErrWebhookURL
	}
	w.start.Do(func() {
		w.Batch = orInt(w.Batch, DefaultWebhookBatch)
		w.Queue = orInt(w.Queue, DefaultWebhookQueue)
		w.Interval = orDuration(w.Interval, DefaultWebhookInterval)
		w.Timeout = orDuration(w.Timeout, DefaultWebhookTimeout)
		if w.Retries == 0 {
			w.Retries = DefaultWebhookRetries
		}
		if w.Logger == nil {
			w.Logger = slog.Default()
		}
		w.ch = make(chan Event, w.Queue)
		w.ctx, w.cancel = context.WithCancel(context.Background())
		w.done = make(chan struct{})
		go w.run(u.Scheme + "://" + u.Host + u.Path) // never the query in logs
	})
	return nil
}

// Emit queues e for the next batch, or drops it (counted) if the queue is
// full or the webhook is closed. It never blocks.
func (w *Webhook) Emit(e Event) {
	if w.closed.Load() || w.ch == nil {
		w.dropped.Add(1)
		return
	}
	select {
	case w.ch <- e:
	default:
		w.dropped.Add(1)
	}
}

// Stats returns the webhook's counters.
func (w *Webhook) Stats() WebhookStats {
	return WebhookStats{Sent: w.sent.Load(), Failed: w.failed.Load(), Dropped: w.dropped.Load(),
		Posts: w.posts.Load(), Retries: w.retries.Load()}
}

// Close stops the goroutine and waits for it: a POST in flight, and its
// retries, end at once; events still queued are not sent. It is safe to
// call more than once, and without Start.
func (w *Webhook) Close() {
	w.stop.Do(func() {
		w.closed.Store(true)
		if w.cancel != nil {
			w.cancel()
			<-w.done
		}
	})
}

func (w *Webhook) run(where string) {
	defer close(w.done)
	client := w.client()
	batch := make([]Event, 0, w.Batch)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		select {
		case <-w.ctx.Done():
			return
		case e := <-w.ch:
			if len(batch) == 0 {
				timer.Reset(w.Interval)
			}
			batch = append(batch, e)
			if len(batch) < w.Batch {
				continue
			}
		case <-timer.C:
		}
		timer.Stop()
		if len(batch) > 0 {
			w.post(client, where, batch)
			clear(batch)
			batch = batch[:0]
		}
	}
}

func (w *Webhook) client() *retryablehttp.Client {
	hc := http.Client{}
	if w.Client != nil {
		hc = *w.Client
	}
	hc.Timeout = w.Timeout
	return &retryablehttp.Client{
		HTTPClient:   &hc,
		Logger:       nil, // the library logs URLs; we log the outcome ourselves
		RetryWaitMin: 500 * time.Millisecond,
		RetryWaitMax: 30 * time.Second,
		RetryMax:     max(w.Retries, 0),
		CheckRetry: func(ctx context.Context, resp *http.Response, err error) (bool, error) {
			retry, perr := retryablehttp.DefaultRetryPolicy(ctx, resp, err)
			if retry && ctx.Err() == nil {
				w.retries.Add(1)
			}
			return retry, perr
		},
		Backoff:      retryablehttp.DefaultBackoff, // exponential; honours Retry-After of 429 and 503
		ErrorHandler: retryablehttp.PassthroughErrorHandler,
	}
}

// post sends one batch with its retries and counts the outcome.
func (w *Webhook) post(client *retryablehttp.Client, where string, batch []Event) {
	body, _ := json.Marshal(Batch{V: Version, Events: batch})
	defer w.posts.Add(1)
	req, err := retryablehttp.NewRequestWithContext(w.ctx, http.MethodPost, w.URL, body)
	if err != nil {
		w.failed.Add(uint64(len(batch)))
		w.Logger.Warn("event webhook: request cannot be built", "url", where, "events", len(batch))
		return
	}
	req.Header.Set("Content-Type", "application/json")
	if w.AuthHeader != "" {
		req.Header.Set(w.AuthHeader, w.AuthValue)
	}
	resp, err := client.Do(req)
	if resp != nil {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if resp.StatusCode >= 200 && resp.StatusCode <= 299 {
			w.sent.Add(uint64(len(batch)))
			return
		}
		w.failed.Add(uint64(len(batch)))
		w.Logger.Warn("event webhook: batch dropped", "url", where, "events", len(batch), "answer", strconv.Itoa(resp.StatusCode))
		return
	}
	w.failed.Add(uint64(len(batch)))
	if w.ctx.Err() != nil {
		return // closing
	}
	w.Logger.Warn("event webhook: batch dropped", "url", where, "events", len(batch), "answer", errorKind(err))
}

// errorKind names a transport error without its text (which names the
// whole URL).
func errorKind(err error) string {
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "cancelled"
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		var op *net.OpError
		if errors.As(ue.Err, &op) {
			return fmt.Sprintf("%s error", op.Op)
		}
	}
	return "transport error"
}

func orInt(v, def int) int {
	if v <= 0 {
		return def
	}
	return v
}

func orDuration(v, def time.Duration) time.Duration {
	if v <= 0 {
		return def
	}
	return v
}

// Package smstest is a small SMS gateway over HTTP for tests and demos. It
// records what is sent and lets terminals read their inbox:
//
//	POST /send                        {"to": "...", "text": "..."} → 202 {"id": n}
//	GET  /inbox/{msisdn}?after={id}   → 200 [Message, ...] with ID > after, oldest first
//
// The sender of every recorded message is the server's From number (the
// platform's number). Fault injection (FailNext, RetryAfter, Delay) lets
// tests exercise retries, Retry-After and timeouts; Arrivals tells when each
// attempt came.
package smstest

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/m2mguard/m2mguard/sms"
)

// DefaultFrom is the sender number of recorded messages unless Options.From
// says otherwise.
const DefaultFrom = "+10000000000"

// Options configures a Server.
type Options struct {
	// From is the sender number recorded on every message (default
	// DefaultFrom).
	From string
	// AuthHeader and AuthValue, if set, are required on POST /send
	// (401 otherwise).
	AuthHeader, AuthValue string
	// Now is the clock for Message.At (default time.Now).
	Now func() time.Time
}

// Server is a running test gateway.
type Server struct {
	opts Options
	ln   net.Listener
	srv  *http.Server

	mu         sync.Mutex
	msgs       []sms.Message
	nextID     int64
	failNext   int
	failCode   int
	retryAfter string
	delay      time.Duration
	sends      int
	arrivals   []time.Time
}

// Start starts a gateway listening on addr ("127.0.0.1:0" for a free
// port) with default options.
func Start(addr string) (*Server, error) { return StartWith(addr, Options{}) }

// StartWith starts a gateway with opts.
func StartWith(addr string, opts Options) (*Server, error) {
	if opts.From == "" {
		opts.From = DefaultFrom
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &Server{opts: opts, ln: ln, failCode: http.StatusServiceUnavailable}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /send", s.send)
	mux.HandleFunc("GET /inbox/{msisdn}", s.inbox)
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go s.srv.Serve(ln)
	return s, nil
}

// URL returns the base URL, e.g. http://127.0.0.1:41234 (POST to URL()+"/send").
func (s *Server) URL() string { return "http://" + s.ln.Addr().String() }

// From returns the sender number of recorded messages.
func (s *Server) From() string { return s.opts.From }

// Close stops the server.
func (s *Server) Close() error {
	err := s.srv.Close()
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// FailNext makes the next n sends fail with HTTP 503 without recording
// them.
func (s *Server) FailNext(n int) { s.FailNextWith(n, http.StatusServiceUnavailable) }

// FailNextWith makes the next n sends fail with the HTTP status code.
func (s *Server) FailNextWith(n, code int) {
	s.mu.Lock()
	s.failNext, s.failCode = n, code
	s.mu.Unlock()
}

// RetryAfter makes every injected failure carry the header
// "Retry-After: v" (delay-seconds such as "1", or an HTTP date); "" sends
// none.
func (s *Server) RetryAfter(v string) {
	s.mu.Lock()
	s.retryAfter = v
	s.mu.Unlock()
}

// Delay makes every following send wait d before answering (0 to stop).
func (s *Server) Delay(d time.Duration) {
	s.mu.Lock()
	s.delay = d
	s.mu.Unlock()
}

// Sends returns how many POST /send requests arrived (failed ones too).
func (s *Server) Sends() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sends
}

// Arrivals returns when each POST /send arrived (failed ones too), oldest
// first: tests measure the waits of a sender's retries from them.
func (s *Server) Arrivals() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.arrivals...)
}

// Messages returns every recorded message, oldest first.
func (s *Server) Messages() []sms.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]sms.Message(nil), s.msgs...)
}

// Inject records a message as if it had been sent from from (to test a
// terminal against SMS from a wrong number).
func (s *Server) Inject(from, to, text string) sms.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.record(from, to, text)
}

func (s *Server) record(from, to, text string) sms.Message {
	s.nextID++
	m := sms.Message{ID: s.nextID, To: to, From: from, Text: text, At: s.opts.Now()}
	s.msgs = append(s.msgs, m)
	return m
}

func (s *Server) send(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.sends++
	s.arrivals = append(s.arrivals, time.Now())
	delay := s.delay
	fail := s.failNext > 0
	code, retryAfter := s.failCode, s.retryAfter
	if fail {
		s.failNext--
	}
	s.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	if s.opts.AuthHeader != "" && r.Header.Get(s.opts.AuthHeader) != s.opts.AuthValue {
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	if fail {
		if retryAfter != "" {
			w.Header().Set("Retry-After", retryAfter)
		}
		http.Error(w, "injected failure", code)
		return
	}
	var body struct {
		To   string `json:"to"`
		Text string `json:"text"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 16<<10)).Decode(&body); err != nil || body.To == "" {
		http.Error(w, "want JSON {\"to\", \"text\"}", http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	m := s.record(s.opts.From, body.To, body.Text)
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusAccepted)
	json.NewEncoder(w).Encode(map[string]int64{"id": m.ID})
}

func (s *Server) inbox(w http.ResponseWriter, r *http.Request) {
	msisdn := r.PathValue("msisdn")
	var after int64
	if a := r.URL.Query().Get("after"); a != "" {
		v, err := strconv.ParseInt(a, 10, 64)
		if err != nil || v < 0 {
			http.Error(w, "bad after", http.StatusBadRequest)
			return
		}
		after = v
	}
	s.mu.Lock()
	out := []sms.Message{}
	for _, m := range s.msgs {
		if m.To == msisdn && m.ID > after {
			out = append(out, m)
		}
	}
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

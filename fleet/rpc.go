package fleet

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sync"

	"github.com/nats-io/nats.go"
)

// Request/reply between brokers: a broker handles methods on its own
// subjects, m2mguard.rpc.<brokerID>.<method>, and any broker can call them
// (Request) or call one method on every live broker (Gather). Requests and
// replies are core NATS messages: they are not stored.

// Handler answers a request; an error goes back to the caller as a
// *RemoteError with its text, so it must not carry a secret.
type Handler func(ctx context.Context, req []byte) ([]byte, error)

// Errors of Request and Gather.
var (
	// ErrUnknownBroker: no broker by that id answers the method (it is gone,
	// or does not handle it).
	ErrUnknownBroker = errors.New("fleet: no such broker or method")
	// ErrTimeout: the broker did not answer in time.
	ErrTimeout = errors.New("fleet: request timed out")
)

// RemoteError is the error a remote Handler returned.
type RemoteError struct {
	Broker, Method, Msg string
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("fleet: %s on broker %s: %s", e.Method, e.Broker, e.Msg)
}

// Reply is one broker's answer in Gather.
type Reply struct {
	Broker string
	Data   []byte
	Err    error // ErrUnknownBroker, ErrTimeout, *RemoteError or a transport error
}

const (
	errHeader        = "M2mguard-Error"
	maxConcurrentRPC = 64
)

var methodRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

func rpcSubject(broker, method string) string { return rpcSubjPrefix + broker + "." + method }

// Handle serves method on this broker's subject until stop or Close. At
// most 64 requests run at once (of all methods); the rest wait in NATS's
// queue. Each runs with a context that ends after RequestTimeout or at
// Close.
func (f *Fleet) Handle(method string, h Handler) (stop func(), err error) {
	if !methodRE.MatchString(method) {
		return nil, fmt.Errorf("fleet: handle: method %q", method)
	}
	sem := f.sem
	var wg sync.WaitGroup
	sub, err := f.nc.Subscribe(rpcSubject(f.opts.BrokerID, method), func(m *nats.Msg) {
		if m.Reply == "" {
			return
		}
		select {
		case sem <- struct{}{}:
		case <-f.ctx.Done():
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(f.ctx, f.opts.RequestTimeout)
			defer cancel()
			data, err := h(ctx, m.Data)
			reply := nats.NewMsg(m.Reply)
			if err != nil {
				reply.Header.Set(errHeader, err.Error())
			} else {
				reply.Data = data
			}
			_ = f.nc.PublishMsg(reply)
		}()
	})
	if err == nil {
		err = f.nc.Flush() // the server knows the subscription when Handle returns
	}
	if err != nil {
		return nil, fmt.Errorf("fleet: handle %s: %w", method, err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = sub.Unsubscribe()
			wg.Wait()
		})
	}
	if !f.addCloser(stop) {
		stop()
		return nil, ErrClosed
	}
	return stop, nil
}

// Request calls method on broker and returns its answer. It waits until
// ctx ends or, if ctx has no deadline, RequestTimeout.
func (f *Fleet) Request(ctx context.Context, broker, method string, req []byte) ([]byte, error) {
	if !brokerIDRE.MatchString(broker) || !methodRE.MatchString(method) {
		return nil, fmt.Errorf("%w: %q %q", ErrUnknownBroker, broker, method)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, f.opts.RequestTimeout)
		defer cancel()
	}
	m, err := f.nc.RequestMsgWithContext(ctx, &nats.Msg{Subject: rpcSubject(broker, method), Data: req})
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return nil, fmt.Errorf("%w: %s on %s", ErrUnknownBroker, method, broker)
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout):
		return nil, fmt.Errorf("%w: %s on %s", ErrTimeout, method, broker)
	case err != nil:
		return nil, fmt.Errorf("fleet: %s on %s: %w", method, broker, err)
	}
	if msg := m.Header.Get(errHeader); msg != "" {
		return nil, &RemoteError{Broker: broker, Method: method, Msg: msg}
	}
	return m.Data, nil
}

// Gather calls method on every live broker (this one included) at once and
// returns their replies, one per broker, sorted by broker id, once all have
// answered or failed: a broker that is gone fails with ErrUnknownBroker at
// once, one that does not answer with ErrTimeout when ctx (or
// RequestTimeout) ends.
func (f *Fleet) Gather(ctx context.Context, method string, req []byte) ([]Reply, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, f.opts.RequestTimeout)
		defer cancel()
	}
	brokers, err := f.Brokers(ctx)
	if err != nil {
		return nil, err
	}
	replies := make([]Reply, len(brokers))
	var wg sync.WaitGroup
	for i, b := range brokers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data, err := f.Request(ctx, b, method, req)
			replies[i] = Reply{Broker: b, Data: data, Err: err}
		}()
	}
	wg.Wait()
	return replies, nil
}

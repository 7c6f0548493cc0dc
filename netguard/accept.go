package netguard

import (
	"errors"
	"net"
	"syscall"
	"time"
)

// The pauses of Accept after temporary errors: the first, doubled after
// every error in a row up to the last. They are net/http.Server.Serve's.
const (
	MinAcceptDelay = 5 * time.Millisecond
	MaxAcceptDelay = time.Second
)

// Temporary reports whether err, returned by a listener's Accept, is
// worth trying again after a pause: the process or the system is out of
// file descriptors (EMFILE, ENFILE) or memory (ENOBUFS, ENOMEM), a client
// went away before it was accepted (ECONNABORTED), or the error says
// itself that it is temporary or a timeout. A closed listener's error is
// never temporary.
func Temporary(err error) bool {
	if err == nil || errors.Is(err, net.ErrClosed) {
		return false
	}
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, errno) {
			return true
		}
	}
	// Temporary is deprecated on net.Error for the errors it describes
	// badly, but accept's are those it describes well (net/http relies on
	// it the same way).
	var temp interface{ Temporary() bool }
	if errors.As(err, &temp) && temp.Temporary() {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// backOff handles an error of the inner listener's Accept: for a
// temporary one on an open listener, it counts it, reports it and pauses
// (prev doubled, within MinAcceptDelay..MaxAcceptDelay), then returns the
// pause it took and nil; otherwise, or if l is closed meanwhile, it
// returns the error to give the caller (net.ErrClosed once l is closed).
func (l *Listener) backOff(err error, prev time.Duration) (time.Duration, error) {
	select {
	case <-l.done:
		return prev, net.ErrClosed
	default:
	}
	if !Temporary(err) {
		return prev, err
	}
	delay := min(max(2*prev, MinAcceptDelay), MaxAcceptDelay)
	l.g.acceptErrors.Add(1)
	if l.g.opts.OnAcceptError != nil {
		l.g.opts.OnAcceptError(err, delay)
	}
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
		return delay, nil
	case <-l.done:
		return delay, net.ErrClosed
	}
}

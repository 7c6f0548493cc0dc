package hook

import (
	"context"
	"sync"
	"time"
)

// deadlineCtx is context.WithDeadline made lazily: its channel, its timer
// and its watch of the parent are made only when something calls Done. A
// login's registry calls are served from the key service's cache and its
// replay claim from memory (which reads Err, never Done): none waits, and
// context.WithTimeout cost four allocations each (the context, its timer,
// the timer's function, the cancel function), two contexts a login. A
// call that waits (a cache miss, a fleet's claim) gets the same context
// as from context.WithDeadline.
//
// Err and Done agree as the context package requires: Err is non-nil
// exactly once Done's channel is (or would be, not made yet) closed;
// Err closes it itself if it finds the deadline past before the timer
// fired. The owner calls release when done with it, like a CancelFunc.
type deadlineCtx struct {
	parent context.Context
	at     time.Time

	mu         sync.Mutex
	done       chan struct{}
	err        error
	stopTimer  func() bool // Done's timer, once made
	stopParent func() bool // Done's context.AfterFunc on the parent, once made
}

// start makes the zero c a context that ends at now+d or when parent ends.
func (c *deadlineCtx) start(parent context.Context, d time.Duration) {
	c.parent, c.at = parent, time.Now().Add(d)
}

// loginDeadlines are the two deadlines of a terminal login in one
// allocation: its registry calls' (Options.StoreTimeout) and its replay
// claim's (Options.ClaimTimeout, started with the claim).
type loginDeadlines struct{ store, claim deadlineCtx }

// Deadline returns the earlier of its own deadline and the parent's.
func (c *deadlineCtx) Deadline() (time.Time, bool) {
	if pd, ok := c.parent.Deadline(); ok && pd.Before(c.at) {
		return pd, true
	}
	return c.at, true
}

// Value is the parent's.
func (c *deadlineCtx) Value(key any) any { return c.parent.Value(key) }

// Done makes the channel, closed already if the context has ended, else
// closed by a timer at the deadline or when the parent ends.
func (c *deadlineCtx) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done != nil {
		return c.done
	}
	if c.checkLocked() != nil { // ended before anyone waited: born closed
		c.done = make(chan struct{})
		close(c.done)
		return c.done
	}
	c.done = make(chan struct{})
	c.stopTimer = time.AfterFunc(time.Until(c.at), func() { c.end(context.DeadlineExceeded) }).Stop
	c.stopParent = context.AfterFunc(c.parent, func() { c.end(c.parent.Err()) })
	return c.done
}

// Err returns nil while the context lasts, then why it ended.
func (c *deadlineCtx) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.checkLocked()
}

// checkLocked ends the context if its deadline is past or its parent has
// ended, and returns its error; c.mu is held.
func (c *deadlineCtx) checkLocked() error {
	if c.err == nil {
		if err := c.parent.Err(); err != nil {
			c.endLocked(err)
		} else if !time.Now().Before(c.at) {
			c.endLocked(context.DeadlineExceeded)
		}
	}
	return c.err
}

// end ends the context with err, once.
func (c *deadlineCtx) end(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.endLocked(err)
}

func (c *deadlineCtx) endLocked(err error) {
	if c.err != nil {
		return
	}
	c.err = err
	if c.done != nil {
		close(c.done)
	}
	c.stopLocked()
}

// stopLocked stops Done's timer and parent watch, if made.
func (c *deadlineCtx) stopLocked() {
	if c.stopTimer != nil {
		c.stopTimer()
		c.stopParent()
		c.stopTimer, c.stopParent = nil, nil
	}
}

// release ends the context (context.Canceled, as a CancelFunc would) and
// frees its timer; the owner calls it once done with the context.
func (c *deadlineCtx) release() {
	c.end(context.Canceled)
}

package hook

import (
	"context"
	"errors"
	"testing"
	"time"
)

type ctxKey struct{}

// newDeadline returns a started deadlineCtx.
func newDeadline(parent context.Context, d time.Duration) *deadlineCtx {
	c := new(deadlineCtx)
	c.start(parent, d)
	return c
}

// closedSoon reports whether ch is closed within a generous wait (a condition,
// not a sleep: it returns as soon as the channel closes).
func closedSoon(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	case <-time.After(10 * time.Second):
		return false
	}
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// TestDeadlineCtx checks deadlineCtx against what context.WithTimeout
// gives: the deadline, the parent's end, the owner's release, Err and
// Done agreeing whichever is called first, values, and contexts derived
// from it.
func TestDeadlineCtx(t *testing.T) {
	t.Parallel()
	t.Run("deadline closes Done", func(t *testing.T) {
		t.Parallel()
		parent, cancel := context.WithCancel(context.Background()) // like the crew's
		defer cancel()
		c := newDeadline(parent, 20*time.Millisecond)
		defer c.release()
		if c.Err() != nil || context.Cause(c) != nil {
			t.Fatalf("Err before the deadline: %v (cause %v)", c.Err(), context.Cause(c))
		}
		if !closedSoon(c.Done()) {
			t.Fatal("Done not closed after the deadline")
		}
		if !errors.Is(c.Err(), context.DeadlineExceeded) || !errors.Is(context.Cause(c), context.DeadlineExceeded) {
			t.Fatalf("Err = %v, cause %v, want DeadlineExceeded", c.Err(), context.Cause(c))
		}
	})
	t.Run("Err past the deadline closes Done", func(t *testing.T) {
		t.Parallel()
		c := newDeadline(context.Background(), -time.Second)
		defer c.release()
		if !errors.Is(c.Err(), context.DeadlineExceeded) {
			t.Fatalf("Err = %v, want DeadlineExceeded", c.Err())
		}
		if !isClosed(c.Done()) {
			t.Fatal("Done open after Err reported the end")
		}
	})
	t.Run("Done past the deadline is closed", func(t *testing.T) {
		t.Parallel()
		c := newDeadline(context.Background(), -time.Second)
		defer c.release()
		if !isClosed(c.Done()) {
			t.Fatal("Done open past the deadline")
		}
		if !errors.Is(c.Err(), context.DeadlineExceeded) {
			t.Fatalf("Err = %v, want DeadlineExceeded", c.Err())
		}
	})
	t.Run("parent end", func(t *testing.T) {
		t.Parallel()
		parent, cancel := context.WithCancel(context.Background())
		c := newDeadline(parent, time.Hour)
		defer c.release()
		done := c.Done()
		cancel()
		if !closedSoon(done) {
			t.Fatal("Done not closed when the parent ended")
		}
		if !errors.Is(c.Err(), context.Canceled) {
			t.Fatalf("Err = %v, want Canceled", c.Err())
		}
	})
	t.Run("parent ended before Err", func(t *testing.T) {
		t.Parallel()
		parent, cancel := context.WithCancel(context.Background())
		cancel()
		c := newDeadline(parent, time.Hour)
		defer c.release()
		if !errors.Is(c.Err(), context.Canceled) || !isClosed(c.Done()) {
			t.Fatalf("Err = %v, Done closed %v; want Canceled and closed", c.Err(), isClosed(c.Done()))
		}
	})
	t.Run("release", func(t *testing.T) {
		t.Parallel()
		for _, doneFirst := range []bool{false, true} {
			c := newDeadline(context.Background(), time.Hour)
			var done <-chan struct{}
			if doneFirst {
				done = c.Done()
			}
			c.release()
			if !errors.Is(c.Err(), context.Canceled) {
				t.Fatalf("Err after release = %v, want Canceled", c.Err())
			}
			if done == nil {
				done = c.Done()
			}
			if !isClosed(done) {
				t.Fatal("Done open after release")
			}
			c.release() // twice: nothing happens
		}
	})
	t.Run("deadline and value", func(t *testing.T) {
		t.Parallel()
		parent, cancel := context.WithTimeout(context.WithValue(context.Background(), ctxKey{}, "v"), time.Minute)
		defer cancel()
		c := newDeadline(parent, time.Hour)
		defer c.release()
		pd, _ := parent.Deadline()
		if d, ok := c.Deadline(); !ok || !d.Equal(pd) {
			t.Errorf("Deadline = %v %v, want the parent's earlier %v", d, ok, pd)
		}
		short := newDeadline(parent, time.Second)
		defer short.release()
		if d, ok := short.Deadline(); !ok || !d.Before(pd) {
			t.Errorf("Deadline = %v %v, want its own, before %v", d, ok, pd)
		}
		if c.Value(ctxKey{}) != "v" {
			t.Errorf("Value = %v, want the parent's", c.Value(ctxKey{}))
		}
	})
	t.Run("derived context ends with it", func(t *testing.T) {
		t.Parallel()
		c := newDeadline(context.Background(), 20*time.Millisecond)
		defer c.release()
		child, cancel := context.WithTimeout(c, time.Hour)
		defer cancel()
		if !closedSoon(child.Done()) {
			t.Fatal("derived context not ended at the deadline")
		}
		if !errors.Is(child.Err(), context.DeadlineExceeded) {
			t.Fatalf("derived Err = %v, want DeadlineExceeded", child.Err())
		}
	})
}

// TestDeadlineCtxAllocs: a deadline nobody waits on costs one allocation
// (context.WithTimeout cost four).
func TestDeadlineCtxAllocs(t *testing.T) {
	if a := testing.AllocsPerRun(100, func() {
		c := newDeadline(context.Background(), time.Second)
		_ = c.Err()
		c.release()
	}); a > 1 {
		t.Errorf("an unwaited deadline allocates %.0f times, want 1", a)
	}
}

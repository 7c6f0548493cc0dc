package sessionstore

import (
	bolt "go.etcd.io/bbolt"
)

// Writes are group-committed. Every event hands its change to the one
// writer goroutine and waits until it is committed; the writer commits
// whatever has queued up while the previous transaction ran, in one
// transaction (at most maxBatch changes). Each client's events stay in
// order (each waits for its commit); a busy broker pays one commit for
// many changes, an idle one a single commit per change as before, and
// there is no timer: bbolt's own Batch waits for one, which cost about a
// millisecond per message here.

const maxBatch = 256

type change struct {
	fn   func(*bolt.Tx) error
	done chan error
}

// startWriter starts the writer; Close stops it (stopWriter).
func (h *Hook) startWriter() {
	h.changes = make(chan change, maxBatch)
	h.writerStop = make(chan struct{})
	h.donePool.New = func() any { return make(chan error, 1) }
	h.writerWG.Add(1)
	go h.writer()
}

// stopWriter ends the writer, once no update is in flight (Close holds
// mu for writing).
func (h *Hook) stopWriter() {
	close(h.writerStop)
	h.writerWG.Wait()
}

func (h *Hook) writer() {
	defer h.writerWG.Done()
	for {
		var batch []change
		select {
		case c := <-h.changes:
			batch = append(batch, c)
		case <-h.writerStop:
			return
		}
	more:
		for len(batch) < maxBatch {
			select {
			case c := <-h.changes:
				batch = append(batch, c)
			default:
				break more
			}
		}
		h.commit(batch)
	}
}

// commit writes batch in one transaction. If it fails, each change is
// committed alone, so that only the one at fault fails.
func (h *Hook) commit(batch []change) {
	err := h.db.Update(func(tx *bolt.Tx) error {
		for _, c := range batch {
			if err := c.fn(tx); err != nil {
				return err
			}
		}
		return nil
	})
	h.commits.Add(1)
	if err == nil || len(batch) == 1 {
		for _, c := range batch {
			c.done <- err
		}
		return
	}
	for _, c := range batch {
		c.done <- h.db.Update(c.fn)
	}
}

// update commits fn's change (group-committed, above). A failure is
// counted and logged (at most once a second): the broker keeps running,
// the change is in memory only.
func (h *Hook) update(what string, fn func(tx *bolt.Tx) error) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.closed {
		return
	}
	done := h.donePool.Get().(chan error)
	h.changes <- change{fn: fn, done: done}
	err := <-done
	h.donePool.Put(done)
	if err != nil {
		h.failed(what, err)
		return
	}
	h.writes.Add(1)
}

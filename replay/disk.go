package replay

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// disk is the file side of an opened Guard. Its maps are guarded by the
// Guard's mu.
type disk struct {
	dir      string
	lock     *os.File           // holds the directory (lockFile)
	segs     map[int64]*segment // by window end, unix seconds
	horizon  int64              // the latest end of a removed file
	newFiles bool               // a file was created since the last directory sync

	stop chan struct{} // closed by close
	done chan struct{} // closed when the sync loop has returned
}

// segment is the file of one window.
type segment struct {
	end     int64
	path    string
	f       *os.File       // opened for appending on the first claim; nil before
	writers sync.WaitGroup // claims writing to f
	dirty   atomic.Bool    // written since the last fsync
}

const filePrefix, fileSuffix = "claims-", ".log"

func segmentName(end int64) string { return filePrefix + strconv.FormatInt(end, 10) + fileSuffix }

// parseSegmentName returns the window end of a claims file name.
func parseSegmentName(name string) (int64, bool) {
	s, ok := strings.CutPrefix(name, filePrefix)
	if !ok {
		return 0, false
	}
	if s, ok = strings.CutSuffix(s, fileSuffix); !ok {
		return 0, false
	}
	end, err := strconv.ParseInt(s, 10, 64)
	return end, err == nil && end > 0
}

func openDisk(dir string) (*disk, error) {
	lock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	return &disk{dir: dir, lock: lock, segs: map[int64]*segment{}}, nil
}

type loadStats struct {
	files, claims, removed int
	skipped                int64
}

// load reads every unexpired claims file into g and removes the expired
// ones. It runs before g is shared.
func (d *disk) load(g *Guard, now time.Time) (loadStats, error) {
	var st loadStats
	entries, err := os.ReadDir(d.dir)
	if err != nil {
		return st, fmt.Errorf("replay: %w", err)
	}
	nowNS := now.UnixNano()
	for _, e := range entries {
		end, ok := parseSegmentName(e.Name())
		if !ok || !e.Type().IsRegular() {
			continue
		}
		path := filepath.Join(d.dir, e.Name())
		if end <= now.Unix() {
			if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return st, fmt.Errorf("replay: remove expired file: %w", err)
			}
			d.horizon = max(d.horizon, end)
			st.removed++
			continue
		}
		f, err := os.Open(path)
		if err != nil {
			return st, fmt.Errorf("replay: %w", err)
		}
		skipped, err := readRecords(f, func(k key, until int64) {
			if until > nowNS {
				g.insert(k, until)
				st.claims++
			}
		})
		f.Close()
		if err != nil {
			return st, fmt.Errorf("replay: read %s: %w", path, err)
		}
		st.files++
		st.skipped += skipped
		d.segs[end] = &segment{end: end, path: path}
	}
	return st, nil
}

// segment returns the segment of window end, with its file open for
// appending. Called with the Guard's mu held.
func (d *disk) segment(end int64) (*segment, error) {
	s := d.segs[end]
	if s == nil {
		s = &segment{end: end, path: filepath.Join(d.dir, segmentName(end))}
		d.segs[end] = s
	}
	if s.f == nil {
		f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("replay: open claims file: %w", err)
		}
		s.f = f
		d.newFiles = true
	}
	return s, nil
}

// write appends one record with a single write(2) (O_APPEND: records of
// concurrent claims never interleave).
func (s *segment) write(k key, until int64) error {
	rec := encodeRecord(k, until)
	_, err := s.f.Write(rec[:])
	s.dirty.Store(true)
	if err != nil {
		return fmt.Errorf("replay: write claim: %w", err)
	}
	return nil
}

// start runs the sync loop until close.
func (d *disk) start(g *Guard, every time.Duration) {
	d.stop, d.done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(d.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-d.stop:
				return
			case <-tick.C:
				if err := d.maintain(g); err != nil {
					g.log.Error("replay guard sync failed; a power loss may lose more than one interval of claims", "dir", d.dir, "err", err.Error())
				}
			}
		}
	}()
}

// maintain fsyncs the files written since the last call (and the directory
// if a file was created), drops the windows that have passed from memory,
// and removes their files.
func (d *disk) maintain(g *Guard) error {
	now := g.now()
	g.mu.Lock()
	g.dropExpired(now)
	var live, expired []*segment
	for end, s := range d.segs {
		switch {
		case end <= now.Unix():
			expired = append(expired, s)
			delete(d.segs, end)
			d.horizon = max(d.horizon, end)
		case s.f != nil:
			live = append(live, s)
		}
	}
	newFiles := d.newFiles
	d.newFiles = false
	g.mu.Unlock()

	var errs []error
	for _, s := range live {
		if s.dirty.Swap(false) {
			if err := s.f.Sync(); err != nil {
				s.dirty.Store(true) // try again next time
				errs = append(errs, fmt.Errorf("fsync %s: %w", s.path, err))
			}
		}
	}
	if newFiles {
		if err := syncDir(d.dir); err != nil {
			g.mu.Lock()
			d.newFiles = true
			g.mu.Unlock()
			errs = append(errs, err)
		}
	}
	for _, s := range expired {
		s.writers.Wait()
		if s.f != nil {
			s.f.Close()
		}
		if err := os.Remove(s.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// close stops the sync loop, waits for the claims being written, fsyncs
// and closes every file and releases the directory. The Guard is marked
// closed already: no claim starts a write any more.
func (d *disk) close() error {
	close(d.stop)
	<-d.done
	var errs []error
	for _, s := range d.segs {
		s.writers.Wait()
		if s.f == nil {
			continue
		}
		if err := s.f.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("replay: fsync %s: %w", s.path, err))
		}
		if err := s.f.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := syncDir(d.dir); err != nil {
		errs = append(errs, err)
	}
	d.unlock()
	return errors.Join(errs...)
}

func (d *disk) unlock() {
	d.lock.Close() // closing the descriptor releases the lock
}

// syncDir makes the directory entries of created files durable.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("replay: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("replay: fsync %s: %w", dir, err)
	}
	return nil
}

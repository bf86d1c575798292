package fetch

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// groupSync makes written files durable in groups: one syncfs(2) of the
// store's filesystem covers every file written before it began, so
// concurrent downloads share one writeback-and-flush instead of paying one
// fsync (and one disk cache flush) each. Rounds begin at most one per
// gap: a round asked for sooner after the last one began waits for the
// rest of the gap, and covers every file whose writes completed before it
// began, those of the calls that came during the wait included. A cold
// pull of many small objects otherwise ran a syncfs (a journal commit and
// a disk cache flush) per few objects, back to back.
type groupSync struct {
	dir    *os.File      // a descriptor on the store's filesystem
	noSync bool          // Options.UnsafeNoSync: rounds do nothing
	gap    time.Duration // least time between the starts of two rounds

	mu        sync.Mutex
	running   bool          // a round is waiting for its start or running
	started   uint64        // rounds begun
	finished  uint64        // rounds ended
	lastStart time.Time     // when the last round began
	done      chan struct{} // closed when the running round ends
	err       error         // error of the last round that failed
	errRound  uint64        // which round that was
}

// syncRoundGap is the least time between two group syncs. It bounds them
// to 200 a second, and adds at most that much to an object's time to
// durability (disks take longer than that for a flush anyway).
const syncRoundGap = 5 * time.Millisecond

func newGroupSync(dir string, noSync bool) (*groupSync, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	return &groupSync{dir: f, noSync: noSync, gap: syncRoundGap}, nil
}

func (g *groupSync) close() error { return g.dir.Close() }

// wait returns once a syncfs that began after the call has ended: every
// file whose writes completed before the call is then on stable storage.
// It returns the error of that syncfs (or ctx's).
func (g *groupSync) wait(ctx context.Context) error {
	g.mu.Lock()
	// A running round may have begun before our writes; one waiting for
	// its start has not (started counts it once it begins).
	target := g.started + 1
	for {
		if g.finished >= target {
			var err error
			if g.err != nil && g.errRound >= target {
				err = g.err
			}
			g.mu.Unlock()
			return err
		}
		if !g.running {
			g.running = true
			g.done = make(chan struct{})
			if wait := time.Until(g.lastStart.Add(g.gap)); wait > 0 {
				// Not cut short by ctx: the calls that come meanwhile
				// wait for this round.
				g.mu.Unlock()
				time.Sleep(wait)
				g.mu.Lock()
			}
			g.started++
			round := g.started
			g.lastStart = time.Now()
			g.mu.Unlock()
			err := g.syncfs()
			g.mu.Lock()
			g.running = false
			g.finished = round
			if err != nil {
				g.err, g.errRound = err, round
			}
			close(g.done)
			continue
		}
		done := g.done
		g.mu.Unlock()
		select {
		case <-done:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		g.mu.Lock()
	}
}

func (g *groupSync) syncfs() error {
	if g.noSync {
		return nil
	}
	conn, err := g.dir.SyscallConn()
	if err != nil {
		return fmt.Errorf("syncing the store: %w", err)
	}
	var serr error
	if err := conn.Control(func(fd uintptr) {
		serr = ignoringEINTR(func() error { return unix.Syncfs(int(fd)) })
	}); err != nil {
		return fmt.Errorf("syncing the store: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("syncing the store: %w", serr)
	}
	return nil
}

func ignoringEINTR(fn func() error) error {
	for {
		err := fn()
		if err != unix.EINTR {
			return err
		}
	}
}

// writebackFile writes to f and starts the kernel's writeback of every
// writebackChunk bytes as soon as they are written, so that the data is
// mostly on disk already when the group sync asks for it.
type writebackFile struct {
	f       *os.File
	off     int64 // bytes written
	started int64 // bytes whose writeback was started
}

const writebackChunk = 4 << 20

func (w *writebackFile) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.off += int64(n)
	if w.off-w.started >= writebackChunk {
		w.startWriteback()
	}
	return n, err
}

// startWriteback starts (without waiting for) the writeback of what was
// written since the last call. It is only a hint: errors are ignored, and
// durability comes from the group sync.
func (w *writebackFile) startWriteback() {
	if w.off == w.started {
		return
	}
	if conn, err := w.f.SyscallConn(); err == nil {
		_ = conn.Control(func(fd uintptr) {
			_ = unix.SyncFileRange(int(fd), w.started, w.off-w.started, unix.SYNC_FILE_RANGE_WRITE)
		})
	}
	w.started = w.off
}

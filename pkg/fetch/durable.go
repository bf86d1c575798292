package fetch

import (
	"context"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// groupSync makes written files durable in groups: one syncfs(2) of the
// store's filesystem covers every file written before it began, so
// concurrent downloads share one writeback-and-flush instead of paying one
// fsync (and one disk cache flush) each.
type groupSync struct {
	dir    *os.File // a descriptor on the store's filesystem
	noSync bool     // Options.UnsafeNoSync: rounds do nothing

	mu       sync.Mutex
	running  bool
	started  uint64        // rounds begun
	finished uint64        // rounds ended
	done     chan struct{} // closed when the running round ends
	err      error         // error of the last round that failed
	errRound uint64        // which round that was
}

func newGroupSync(dir string, noSync bool) (*groupSync, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	return &groupSync{dir: f, noSync: noSync}, nil
}

func (g *groupSync) close() error { return g.dir.Close() }

// wait returns once a syncfs that began after the call has ended: every
// file whose writes completed before the call is then on stable storage.
// It returns the error of that syncfs (or ctx's).
func (g *groupSync) wait(ctx context.Context) error {
	g.mu.Lock()
	target := g.started + 1 // a running round may have begun before our writes
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
			g.started++
			round := g.started
			g.done = make(chan struct{})
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

package fetch

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"

	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// ErrResourceLimit: the node's limits do not allow the request now (an
// object larger than MaxObjectSize, or than the free space allows). Not
// retried by the store; the driver answers ResourceExhausted, which kubelet
// retries later (GC may have freed space meanwhile).
var ErrResourceLimit = errors.New("over the node's resource limits")

// Node-wide budgets (Options.DownloadBudget, ParseMemory): what a request
// needs is reserved before the work starts, and a request that does not
// fit waits (first come, first served) rather than fails. A request larger
// than the whole budget waits until nothing else holds any of it and then
// runs alone, so one large image or object is never refused by a budget.
type budget struct {
	sem   *semaphore.Weighted // nil: no budget
	size  int64
	inUse atomic.Int64 // reserved now
	waits atomic.Uint64
}

func newBudget(size int64) *budget {
	b := &budget{size: size}
	if size > 0 {
		b.sem = semaphore.NewWeighted(size)
	}
	return b
}

// reservation is part of a budget held by one request.
type reservation struct {
	b *budget
	n int64
}

// reserve waits until n bytes of the budget are free (at most the whole
// budget) and takes them, or fails with ctx's cause.
func (b *budget) reserve(ctx context.Context, n int64) (*reservation, error) {
	n = max(n, 0)
	if b.sem != nil {
		n = min(n, b.size)
		if !b.sem.TryAcquire(n) {
			b.waits.Add(1)
			if err := b.sem.Acquire(ctx, n); err != nil {
				return nil, context.Cause(ctx)
			}
		}
	}
	b.inUse.Add(n)
	return &reservation{b: b, n: n}, nil
}

// shrink gives back what the request turned out not to need.
func (r *reservation) shrink(to int64) {
	to = max(to, 0)
	if r == nil || to >= r.n {
		return
	}
	give := r.n - to
	r.n = to
	r.b.inUse.Add(-give)
	if r.b.sem != nil {
		r.b.sem.Release(give)
	}
}

// release gives the whole reservation back; it may be called again.
func (r *reservation) release() {
	if r != nil {
		r.shrink(0)
	}
}

// reserveImageDownload reserves room in tmp/ for an image download before
// its request is sent: MaxImageSize+1 bytes (what the copy may write),
// shrunk once the response announces its length.
func (s *Store) reserveImageDownload(ctx context.Context) (*reservation, error) {
	r, err := s.tmpBudget.reserve(ctx, s.opts.MaxImageSize+1)
	if err != nil {
		return nil, fmt.Errorf("waiting for room in the download budget: %w", err)
	}
	return r, nil
}

// admitObjects refuses, before anything is downloaded, an image whose
// missing objects cannot be stored: one larger than MaxObjectSize, or all
// of them together more than the store's filesystem has free beyond
// MinFreeSpace.
func (s *Store) admitObjects(missing []cfs.Object) error {
	var total uint64
	for _, o := range missing {
		if err := s.checkObjectSize(o); err != nil {
			return err
		}
		total += o.Size
	}
	if len(missing) == 0 || s.opts.MinFreeSpace < 0 {
		return nil
	}
	free, err := s.freeSpace()
	if err != nil {
		return err
	}
	if avail := free - s.opts.MinFreeSpace - s.tmpBudget.inUse.Load(); total > uint64(max(avail, 0)) {
		return fmt.Errorf("%d missing objects (%d bytes) do not fit: the store's filesystem has %d bytes free, %d of them kept free and %d reserved by downloads in progress: %w: %w",
			len(missing), total, free, s.opts.MinFreeSpace, s.tmpBudget.inUse.Load(), ErrResourceLimit, syscall.ENOSPC)
	}
	return nil
}

func (s *Store) checkObjectSize(o cfs.Object) error {
	if s.opts.MaxObjectSize > 0 && o.Size > uint64(s.opts.MaxObjectSize) {
		return fmt.Errorf("object %s is %d bytes, more than the node's maximum object size of %d: %w",
			o.Digest, o.Size, s.opts.MaxObjectSize, ErrResourceLimit)
	}
	return nil
}

// admitObjectDownload reserves room in tmp/ for downloading o (waiting
// while the download budget is spent), then checks that o fits in the free
// space beyond MinFreeSpace and what other downloads have reserved (which
// counts their bytes already written twice: on the safe side). The free
// space is measured at most every freeSpaceMaxAge (freeSpaceCache), and
// always before a refusal.
func (s *Store) admitObjectDownload(ctx context.Context, o cfs.Object) (*reservation, error) {
	if err := s.checkObjectSize(o); err != nil {
		return nil, err
	}
	r, err := s.tmpBudget.reserve(ctx, int64(o.Size)+1)
	if err != nil {
		return nil, fmt.Errorf("waiting for room in the download budget: %w", err)
	}
	if s.opts.MinFreeSpace < 0 {
		return r, nil
	}
	for fresh := false; ; fresh = true {
		free, err := s.objectFreeSpace(fresh)
		if err != nil {
			r.release()
			return nil, err
		}
		others := s.tmpBudget.inUse.Load() - r.n
		if avail := free - s.opts.MinFreeSpace - others; o.Size <= uint64(max(avail, 0)) {
			s.admitted(int64(o.Size))
			return r, nil
		}
		if !fresh {
			continue // refuse only on a fresh measurement
		}
		r.release()
		return nil, fmt.Errorf("object %s (%d bytes) does not fit: the store's filesystem has %d bytes free, %d of them kept free and %d reserved by other downloads: %w: %w",
			o.Digest, o.Size, free, s.opts.MinFreeSpace, others, ErrResourceLimit, syscall.ENOSPC)
	}
}

// freeSpace is what the store's filesystem has free for unprivileged
// writers (root's reserved blocks are left to the node).
func (s *Store) freeSpace() (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.root, &st); err != nil {
		return 0, fmt.Errorf("measuring the free space of %s: %w", s.root, err)
	}
	return int64(min(st.Bavail*uint64(st.Bsize), 1<<62)), nil
}

// parseBytesPerImageByte is the most memory per byte of image that the
// estimate of a tree and its canonical check (cfs.ImageStats.Memory) can
// reach (cfs.MaxMemoryPerByte: hard links and xattrs, many entries in few
// bytes), so neither the image's size alone nor the inode count its
// superblock claims bound it more tightly. A download reserves that much
// (at most the whole budget), its parse may not exceed the reservation
// (cfs.ErrTooLarge past it), and the reservation then shrinks to the
// tree's estimate. Images of ordinary files are estimated at 3 to 14
// bytes per byte; TestParseEstimate measures them.
const parseBytesPerImageByte = cfs.MaxMemoryPerByte

// parseEstimate estimates the memory cfs.Open takes for an image of size
// bytes.
func parseEstimate(size int64) int64 {
	return max(size, 0) * parseBytesPerImageByte
}

// reserveParse waits until the parse memory budget has room for parsing
// an image of size bytes, and reserves it; release when the parse is over.
func (s *Store) reserveParse(ctx context.Context, size int64) (*reservation, error) {
	res, err := s.parseBudget.reserve(ctx, parseEstimate(size))
	if err != nil {
		return nil, fmt.Errorf("waiting for room in the image parsing budget: %w", err)
	}
	return res, nil
}

// BudgetStats tell how the node-wide budgets are used.
type BudgetStats struct {
	DownloadBytesReserved int64  // bytes downloads hold in tmp/ now
	DownloadWaits         uint64 // downloads that had to wait for room, since Open
	ParseBytesReserved    int64  // estimated memory of the parses running now
	ParseWaits            uint64 // parses that had to wait for room, since Open
}

// Budgets returns how the node-wide budgets are used.
func (s *Store) Budgets() BudgetStats {
	return BudgetStats{
		DownloadBytesReserved: s.tmpBudget.inUse.Load(),
		DownloadWaits:         s.tmpBudget.waits.Load(),
		ParseBytesReserved:    s.parseBudget.inUse.Load(),
		ParseWaits:            s.parseBudget.waits.Load(),
	}
}

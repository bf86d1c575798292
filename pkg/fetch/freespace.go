package fetch

import (
	"sync"
	"time"
)

// freeSpaceMaxAge is how long a measurement of the store's free space
// serves the per-object checks of admitObjectDownload.
const freeSpaceMaxAge = 100 * time.Millisecond

// freeSpaceCache spares the per-object check of the free space a statfs
// per object: it keeps the last measurement and the bytes of the objects
// admitted since, and answers the measurement less those bytes while it is
// younger than freeSpaceMaxAge. That errs on the safe side for the store's
// own writes (an admitted object counts as written in full, and again as
// reserved while it is in tmp/); space others take or free on the
// filesystem shows at the next measurement. A check that would refuse an
// object measures again first, so that a refusal is always judged on a
// fresh statfs.
type freeSpaceCache struct {
	mu       sync.Mutex
	at       time.Time // of the last measurement; zero: none
	free     int64     // measured then
	admitted int64     // bytes of the objects admitted since
}

// objectFreeSpace is the free space to judge an object download against;
// fresh forces a new measurement. The caller reports each object it admits
// with admitted.
func (s *Store) objectFreeSpace(fresh bool) (int64, error) {
	c := &s.freeCache
	c.mu.Lock()
	defer c.mu.Unlock()
	if !fresh && !c.at.IsZero() && time.Since(c.at) < freeSpaceMaxAge {
		return c.free - c.admitted, nil
	}
	measure := s.freeSpace
	if s.measureFree != nil {
		measure = s.measureFree
	}
	free, err := measure()
	if err != nil {
		return 0, err
	}
	c.at, c.free, c.admitted = time.Now(), free, 0
	return free, nil
}

// admitted records an object of size bytes admitted after the free space
// was judged.
func (s *Store) admitted(size int64) {
	c := &s.freeCache
	c.mu.Lock()
	c.admitted += size
	c.mu.Unlock()
}

package driver

import "sync"

// targetLocks serialises calls on one target path. A second call on a
// busy target does not wait: CSI lets the plugin answer Aborted, and
// kubelet retries.
type targetLocks struct {
	mu   sync.Mutex
	busy map[string]struct{}
}

func newTargetLocks() *targetLocks {
	return &targetLocks{busy: make(map[string]struct{})}
}

// tryLock takes the lock of target, or reports false when it is held.
func (l *targetLocks) tryLock(target string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.busy[target]; ok {
		return false
	}
	l.busy[target] = struct{}{}
	return true
}

func (l *targetLocks) unlock(target string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.busy, target)
}

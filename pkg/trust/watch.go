package trust

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// DefaultPollInterval is how often a Watcher looks at its file. A
// ConfigMap update reaches a pod's volume within about a minute; reading a
// small file this often costs nothing.
const DefaultPollInterval = 10 * time.Second

// Watcher holds the policy of a file and reloads it when the file's
// content changes (a ConfigMap volume swaps its files atomically, through
// a symlink, so the file is read whole, never half-written). A file that
// cannot be read or parsed keeps the last good policy in force, so that a
// bad edit never opens the node: the failure is logged and counted, and
// the next change is tried again.
type Watcher struct {
	path string
	cur  atomic.Pointer[Policy]

	mu      sync.Mutex
	lastSum [sha256.Size]byte // of the content last looked at, good or bad
	lastErr error             // the failure of that content, if any

	// OnReload, when set, is told of each change of the content looked
	// at: the new policy, or the error that kept the old one.
	OnReload func(p *Policy, err error)
}

// NewWatcher reads and parses the policy at path: a file that cannot be
// read or parsed is an error here (the plugin must not start without the
// policy it was told to enforce).
func NewWatcher(path string) (*Watcher, error) {
	w := &Watcher{path: path}
	b, err := readPolicyFile(path)
	if err != nil {
		return nil, err
	}
	p, err := ParsePolicy(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	w.cur.Store(p)
	w.lastSum = sha256.Sum256(b)
	return w, nil
}

// Path returns the file watched.
func (w *Watcher) Path() string { return w.path }

// Policy returns the policy in force.
func (w *Watcher) Policy() *Policy { return w.cur.Load() }

// Reload reads the file now. It reports whether the policy in force
// changed, and the error that kept the old one (the same error is
// reported once per content: an unchanged bad file is not re-reported).
func (w *Watcher) Reload() (bool, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	b, err := readPolicyFile(w.path)
	if err != nil {
		// A missing or unreadable file is reported each time its error
		// changes; the last good policy stays.
		if w.lastErr == nil || w.lastErr.Error() != err.Error() {
			w.lastErr = err
			w.lastSum = [sha256.Size]byte{}
			w.notify(nil, err)
			return false, err
		}
		return false, nil
	}
	sum := sha256.Sum256(b)
	if sum == w.lastSum {
		return false, nil
	}
	w.lastSum = sum
	p, err := ParsePolicy(b)
	if err != nil {
		err = fmt.Errorf("%s: %w", w.path, err)
		w.lastErr = err
		w.notify(nil, err)
		return false, err
	}
	w.lastErr = nil
	w.cur.Store(p)
	w.notify(p, nil)
	return true, nil
}

func (w *Watcher) notify(p *Policy, err error) {
	if w.OnReload != nil {
		w.OnReload(p, err)
	}
}

// Run reloads the file every interval (DefaultPollInterval when not
// positive) until ctx ends, logging each change.
func (w *Watcher) Run(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = DefaultPollInterval
	}
	log := klog.FromContext(ctx).WithValues("path", w.path)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		changed, err := w.Reload()
		switch {
		case err != nil:
			log.Error(err, "Trust policy not reloaded; the last good policy stays in force", "policy", w.Policy().Digest)
		case changed:
			p := w.Policy()
			log.Info("Trust policy reloaded", "policy", p.Digest, "rules", len(p.rules))
		}
	}
}

// readPolicyFile reads at most MaxPolicyBytes (and one more, to tell).
func readPolicyFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading the trust policy: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxPolicyBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading the trust policy %s: %w", path, err)
	}
	if len(b) > MaxPolicyBytes {
		return nil, fmt.Errorf("trust policy %s: more than %d bytes", path, MaxPolicyBytes)
	}
	return b, nil
}

package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

var (
	errStalled = errors.New("stalled")
	errTooSlow = errors.New("too slow")
)

// rateSlots is how many slots the sliding window of a rateMeter has.
const rateSlots = 4

// rateMeter measures the bytes an attempt received over a sliding window
// (in rateSlots slots) and judges whether the attempt is too slow: fewer
// than minRate bytes per second over the last window, or none at all.
// Times are passed in, so that tests can use a fake clock.
type rateMeter struct {
	mu      sync.Mutex
	start   time.Time
	window  time.Duration
	slot    time.Duration
	minRate int64 // bytes per second; 0: only a window without any byte is too slow
	cur     int64 // slot number (since start) of counts[cur%len]
	counts  [rateSlots + 1]int64
}

func newRateMeter(now time.Time, window time.Duration, minRate int64) *rateMeter {
	slot := max(window/rateSlots, 1)
	return &rateMeter{start: now, window: slot * rateSlots, slot: slot, minRate: minRate}
}

// advance moves the current slot to the one now is in, clearing the slots
// passed over.
func (m *rateMeter) advance(now time.Time) {
	idx := int64(max(now.Sub(m.start), 0) / m.slot)
	if idx-m.cur >= int64(len(m.counts)) {
		m.counts = [len(m.counts)]int64{}
		m.cur = idx
		return
	}
	for m.cur < idx {
		m.cur++
		m.counts[m.cur%int64(len(m.counts))] = 0
	}
}

// add records n bytes received at now.
func (m *rateMeter) add(now time.Time, n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.advance(now)
	m.counts[m.cur%int64(len(m.counts))] += int64(n)
}

// check reports whether the attempt is too slow at now (never before a
// whole window has passed), with the bytes and span it judged on.
func (m *rateMeter) check(now time.Time) (slow bool, got int64, span time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	elapsed := now.Sub(m.start)
	if elapsed < m.window {
		return false, 0, 0
	}
	m.advance(now)
	for _, c := range m.counts {
		got += c
	}
	// The counts cover the rateSlots whole slots before the current one
	// and the current one so far.
	span = m.window + elapsed - time.Duration(m.cur)*m.slot
	want := max(int64(float64(m.minRate)*span.Seconds()), 1)
	return got < want, got, span
}

// stallContext returns a context for one attempt, cancelled when the
// response sends no byte over StallTimeout or less than MinRate bytes per
// second over the last StallTimeout, the meter to report received bytes
// to, and a func to call when the attempt is over.
func (s *Store) stallContext(ctx context.Context) (context.Context, *rateMeter, func()) {
	actx, cancel := context.WithCancelCause(ctx)
	m := newRateMeter(time.Now(), s.opts.StallTimeout, s.opts.MinRate)
	var (
		mu      sync.Mutex
		stopped bool
		t       *time.Timer
	)
	var tick func()
	tick = func() {
		slow, got, span := m.check(time.Now())
		mu.Lock()
		defer mu.Unlock()
		if stopped {
			return
		}
		if slow {
			if got == 0 {
				cancel(fmt.Errorf("%w: no data for %v", errStalled, span.Round(time.Millisecond)))
			} else {
				cancel(fmt.Errorf("%w: %d bytes in %v, less than %d bytes/s", errTooSlow, got, span.Round(time.Millisecond), s.opts.MinRate))
			}
			return
		}
		t.Reset(m.slot)
	}
	mu.Lock()
	t = time.AfterFunc(m.slot, tick)
	mu.Unlock()
	return actx, m, func() {
		mu.Lock()
		stopped = true
		t.Stop()
		mu.Unlock()
		cancel(nil)
	}
}

// stallError turns the error of an attempt cut by the stall or rate check
// into a transient one (the caller's own deadline or cancellation is not).
func (s *Store) stallError(ctx, actx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w: %w", context.Cause(ctx), err)
	}
	if c := context.Cause(actx); errors.Is(c, errStalled) || errors.Is(c, errTooSlow) {
		return Transient(fmt.Errorf("%v: %v", c, err))
	}
	return err
}

// meterReader reports the bytes every read returns to the attempt's meter.
type meterReader struct {
	r io.Reader
	m *rateMeter
}

func (r meterReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.m.add(time.Now(), n)
	}
	return n, err
}

// retry runs fn until it succeeds, fails permanently, the retries are spent

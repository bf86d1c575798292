package fetch

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// interleave orders the objects of one call for download: the largest,
// then the smallest, then the next largest, and so on. Large objects keep
// the link's bandwidth busy while small ones, a round trip each, are
// fetched beside them; neither a tail of large objects (one stream each,
// the link idling as they finish one by one) nor one of small objects (the
// round trips, not the bandwidth, setting the pace) is left for the end.
func interleave(objs []cfs.Object) []cfs.Object {
	s := slices.Clone(objs)
	slices.SortStableFunc(s, func(a, b cfs.Object) int { return cmp.Compare(b.Size, a.Size) })
	out := make([]cfs.Object, 0, len(s))
	for i, j := 0, len(s)-1; i <= j; {
		out = append(out, s[i])
		i++
		if i <= j {
			out = append(out, s[j])
			j--
		}
	}
	return out
}

// Concurrency that adapts to the link: a call starts initialParallelism
// downloads at once and doubles that, up to Options.Parallelism, while
// every slot is in use and either the bytes received per interval grow by
// growthFactor or more, or the requests still find the link unqueued
// (their mean time to the response headers within queueFactor of the
// shortest seen, plus queueSlack): the round trips, not the bandwidth,
// then set the pace, whatever the sizes of the objects the interval
// happened to fetch (the byte rate alone swings with them). Once two
// intervals in a row show neither, it holds, and doubles again only while
// the requests find the link unqueued (the large objects done, the small
// ones left). A transient failure
// (reset, timeout, 5xx) or an answer asking to slow down (429, 503) halves
// it, and Retry-After holds back new requests until then. The interval is
// four of the shortest round trips seen (time to the response headers),
// within [minAdaptInterval, maxAdaptInterval], so that a doubling shows in
// the throughput before it is judged.
const (
	initialParallelism = 16
	growthFactor       = 1.1
	queueFactor        = 1.5
	queueSlack         = 2 * time.Millisecond
	minAdaptInterval   = 100 * time.Millisecond
	maxAdaptInterval   = time.Second
)

// adaptiveLimit bounds the downloads of one EnsureObjects call in flight.
type adaptiveLimit struct {
	max int
	// inFlight, when set, is how many requests the source serves at
	// once (0: unknown; HTTPSource.MaxInFlight): the limit stays within
	// it, so that over HTTP/2 the transport need not open a second
	// connection (with buffers as large again) for the requests past the
	// server's stream limit, and over HTTP/1.1 no goroutines wait for a
	// connection beyond the ones the transport opens.
	inFlight func() int

	mu       sync.Mutex
	limit    int
	inflight int
	workers  int // goroutines of the call: downloading or waiting to be durable
	peak     int // most in flight since the last adjustment
	// waiters wait for a download slot, first come first served: a slot
	// that frees wakes one of them, not all (a broadcast woke every
	// waiting goroutine, up to three per slot, for each download ending,
	// and most went back to sleep: a few per cent of a pull's CPU).
	waiters []chan struct{}
	woken   int  // waiters woken that have not yet come for their slot
	tick    bool // a timer will adjust and wake (armLocked)
	// workerWake wakes the call's goroutine waiting in acquireWorker.
	workerWake  chan struct{}
	pausedUntil time.Time
	growing     bool
	failed      bool // a failure halved the limit: it never grows again
	flat        int  // adjustments in a row without a gain
	pending     bool // the last doubling is not judged yet
	grewFrom    int  // the limit before it
	lastRate    float64
	lastAdjust  time.Time
	lastBytes   int64
	minRTT      time.Duration
	rttSum      time.Duration // of the requests answered this interval
	rttCount    int

	received atomic.Int64 // bytes received, for the throughput
	now      func() time.Time
	log      klog.Logger // each adjustment at V(5)
}

func newAdaptiveLimit(max int, now func() time.Time, log klog.Logger) *adaptiveLimit {
	if now == nil {
		now = time.Now
	}
	return &adaptiveLimit{
		max: max, limit: min(initialParallelism, max), growing: true,
		workerWake: make(chan struct{}, 1), now: now, lastAdjust: now(), log: log,
	}
}

// acquire waits for a download slot (and for any Retry-After pause). A
// free slot goes to whoever asks first, even while a woken waiter is on
// its way to it (handing it to that waiter would leave it idle until the
// waiter runs); a woken waiter that finds none keeps its place at the
// head of the queue.
func (l *adaptiveLimit) acquire(ctx context.Context) error {
	woken := false
	for {
		l.mu.Lock()
		if woken {
			l.woken--
		}
		l.adjustLocked()
		if !l.pausedLocked() && l.inflight < l.limit {
			l.inflight++
			l.peak = max(l.peak, l.inflight)
			l.mu.Unlock()
			return nil
		}
		ch := make(chan struct{}, 1)
		if woken {
			l.waiters = slices.Insert(l.waiters, 0, ch)
		} else {
			l.waiters = append(l.waiters, ch)
		}
		woken = false
		l.armLocked()
		l.mu.Unlock()
		select {
		case <-ch:
			woken = true
		case <-ctx.Done():
			l.leave(ch)
			return context.Cause(ctx)
		}
	}
}

func (l *adaptiveLimit) pausedLocked() bool { return l.pausedUntil.After(l.now()) }

// armLocked makes sure that a timer runs the adjustment (and ends a
// Retry-After pause) while downloads wait, even when no slot frees.
func (l *adaptiveLimit) armLocked() {
	if l.tick {
		return
	}
	wait := l.intervalLocked()
	if p := l.pausedUntil.Sub(l.now()); p > 0 {
		wait = p
	}
	l.tick = true
	time.AfterFunc(wait, func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.tick = false
		l.adjustLocked()
		l.wakeLocked()
		if len(l.waiters) > 0 {
			l.armLocked()
		}
	})
}

// leave takes ch out of the waiters; when it was woken meanwhile, the
// wake-up goes to the next waiter, so that no free slot is left unclaimed.
func (l *adaptiveLimit) leave(ch chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if i := slices.Index(l.waiters, ch); i >= 0 {
		l.waiters = slices.Delete(l.waiters, i, i+1)
		return
	}
	select {
	case <-ch:
		l.woken--
		l.wakeLocked()
	default:
	}
}

// wakeLocked wakes, first come first served, as many waiters as there are
// free slots not yet promised to a woken one (none during a pause).
func (l *adaptiveLimit) wakeLocked() {
	if len(l.waiters) == 0 || l.pausedLocked() {
		return
	}
	for l.woken < l.limit-l.inflight && len(l.waiters) > 0 {
		l.waiters[0] <- struct{}{}
		l.waiters[0] = nil
		l.waiters = l.waiters[1:]
		l.woken++
	}
}

// acquireWorker waits until the call has fewer than waitersPerSlot
// goroutines per download slot. One goroutine of a call calls it.
func (l *adaptiveLimit) acquireWorker(ctx context.Context) error {
	for {
		l.mu.Lock()
		if l.workers < waitersPerSlot*l.limit {
			l.workers++
			l.mu.Unlock()
			return nil
		}
		l.mu.Unlock()
		select {
		case <-l.workerWake:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}

func (l *adaptiveLimit) releaseWorker() {
	l.mu.Lock()
	l.workers--
	l.mu.Unlock()
	l.wakeWorker()
}

func (l *adaptiveLimit) wakeWorker() {
	select {
	case l.workerWake <- struct{}{}:
	default:
	}
}

func (l *adaptiveLimit) release() {
	l.mu.Lock()
	l.inflight--
	l.adjustLocked()
	l.wakeLocked()
	l.mu.Unlock()
}

// limitChangedLocked wakes whoever a higher limit lets in.
func (l *adaptiveLimit) limitChangedLocked() {
	l.wakeLocked()
	l.wakeWorker()
}

// observeRTT records the time a request took to its response headers.
func (l *adaptiveLimit) observeRTT(d time.Duration) {
	l.mu.Lock()
	if l.minRTT == 0 || d < l.minRTT {
		l.minRTT = d
	}
	l.rttSum += d
	l.rttCount++
	l.mu.Unlock()
}

// capLocked is the most the limit may be: max, or what the source serves
// at once when lower.
func (l *adaptiveLimit) capLocked() int {
	if l.inFlight != nil {
		if n := l.inFlight(); n > 0 && n < l.max {
			return n
		}
	}
	return l.max
}

func (l *adaptiveLimit) intervalLocked() time.Duration {
	return min(max(4*l.minRTT, minAdaptInterval), maxAdaptInterval)
}

// adjustLocked judges the last interval's throughput once it has passed:
// grow while the limit was reached and the throughput grew or the link
// showed no queue; after two intervals without either, hold (undoing a doubling that brought none).
func (l *adaptiveLimit) adjustLocked() {
	if c := l.capLocked(); l.limit > c {
		l.limit = c
	}
	now := l.now()
	elapsed := now.Sub(l.lastAdjust)
	if elapsed < l.intervalLocked() {
		return
	}
	bytes := l.received.Load()
	rate := float64(bytes-l.lastBytes) / elapsed.Seconds()
	bound := l.peak >= l.limit
	var meanRTT time.Duration
	if l.rttCount > 0 {
		meanRTT = l.rttSum / time.Duration(l.rttCount)
	}
	unqueued := l.rttCount > 0 && meanRTT <= time.Duration(queueFactor*float64(l.minRTT))+queueSlack
	l.log.V(5).Info("download concurrency judged", "interval", elapsed, "bytesPerSecond", int64(rate),
		"peakInFlight", l.peak, "limit", l.limit, "inFlight", l.inflight, "growing", l.growing,
		"minRTT", l.minRTT, "meanRTT", meanRTT, "answered", l.rttCount)
	l.lastAdjust, l.lastBytes, l.peak = now, bytes, l.inflight
	l.rttSum, l.rttCount = 0, 0
	if !bound || l.failed {
		return
	}
	if !l.growing {
		// Held since the throughput stopped growing, perhaps while large
		// objects filled the link; once the requests find no queue, the
		// round trips set the pace again (the objects left are smaller):
		// double, and hold there.
		if unqueued && l.limit < l.capLocked() {
			l.limit = min(2*l.limit, l.capLocked())
			l.limitChangedLocked()
		}
		return
	}
	if l.lastRate == 0 || rate >= growthFactor*l.lastRate || unqueued {
		l.flat, l.lastRate, l.pending = 0, rate, false
		if l.limit < l.capLocked() {
			l.grewFrom, l.pending = l.limit, true
			l.limit = min(2*l.limit, l.capLocked())
			l.limitChangedLocked()
		}
		return
	}
	l.flat++
	if l.flat >= 2 {
		// The last doubling, if unrewarded, only costs memory: undo it.
		l.growing = false
		if l.pending {
			l.limit, l.pending = l.grewFrom, false
		}
	}
}

// backOff halves the limit after a failure worth retrying, and holds new
// requests back for retryAfter when the source asked for it.
func (l *adaptiveLimit) backOff(retryAfter time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.limit = max(l.limit/2, 1)
	l.growing, l.failed = false, true
	if retryAfter > 0 {
		if until := l.now().Add(retryAfter); until.After(l.pausedUntil) {
			l.pausedUntil = until
		}
	}
}

// current is the limit now (tests, logs).
func (l *adaptiveLimit) current() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.limit
}

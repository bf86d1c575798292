package fetch

import (
	"context"
	"net/http"
	"sync"
	"testing"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

func TestInterleave(t *testing.T) {
	var objs []cfs.Object
	for _, size := range []uint64{5, 1, 9, 3, 7, 2} {
		objs = append(objs, cfs.Object{Size: size})
	}
	var got []uint64
	for _, o := range interleave(objs) {
		got = append(got, o.Size)
	}
	want := []uint64{9, 1, 7, 2, 5, 3}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	if len(interleave(nil)) != 0 || len(interleave(objs[:1])) != 1 {
		t.Fatal("short lists")
	}
}

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// step runs one interval of a link that delivers rate(limit) bytes per
// second while every slot of the limit is in use, and returns the limit
// the adjustment then sets.
func step(l *adaptiveLimit, clk *fakeClock, rate func(limit int) float64) int {
	l.mu.Lock()
	l.peak = l.limit
	lim := l.limit
	l.mu.Unlock()
	clk.advance(minAdaptInterval)
	l.received.Add(int64(rate(lim) * minAdaptInterval.Seconds()))
	l.mu.Lock()
	l.adjustLocked()
	l.mu.Unlock()
	return l.current()
}

func TestAdaptiveLimit(t *testing.T) {
	for _, c := range []struct {
		name  string
		max   int
		rate  func(limit int) float64
		want  int
		steps int
	}{
		// Round trips set the pace up to 64 in flight, the link beyond: the
		// doubling to 128 brings nothing and is undone.
		{"saturates at 64", 256, func(l int) float64 { return float64(min(l, 64)) * 1e6 }, 64, 10},
		// CPU-bound: more in flight never helps.
		{"flat", 256, func(int) float64 { return 1e6 }, initialParallelism, 10},
		{"grows to the maximum", 100, func(l int) float64 { return float64(l) * 1e6 }, 100, 10},
		{"maximum below the start", 4, func(l int) float64 { return float64(l) * 1e6 }, 4, 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			clk := &fakeClock{t: time.Unix(1e9, 0)}
			l := newAdaptiveLimit(c.max, clk.now, klog.Background())
			var got int
			for range c.steps {
				got = step(l, clk, c.rate)
			}
			if got != c.want {
				t.Fatalf("limit %d, want %d", got, c.want)
			}
		})
	}
}

// The limit grows only while it is reached: a call with fewer downloads
// than slots learns nothing about the link.
// The byte rate falls as the objects left get smaller, while the time to
// the response headers stays at the round trip (the link has no queue):
// round trips set the pace, and the limit grows to the maximum. Once the
// requests wait in a queue (three round trips), a flat rate holds it.
func TestAdaptiveLimitLatencyBound(t *testing.T) {
	for _, c := range []struct {
		name     string
		rttTimes float64
		want     int
	}{
		{"unqueued", 1.2, 256},
		{"queued", 3, initialParallelism}, // the first doubling, unrewarded, undone
	} {
		t.Run(c.name, func(t *testing.T) {
			clk := &fakeClock{t: time.Unix(1e9, 0)}
			l := newAdaptiveLimit(256, clk.now, klog.Background())
			l.observeRTT(20 * time.Millisecond)
			rate := 100e6
			for range 10 {
				for range 5 {
					l.observeRTT(time.Duration(c.rttTimes * float64(20*time.Millisecond)))
				}
				step(l, clk, func(int) float64 { return rate })
				rate *= 0.8
			}
			if got := l.current(); got != c.want {
				t.Fatalf("limit %d, want %d", got, c.want)
			}
		})
	}
}

// Large objects first fill the link (a queue, no gain from 64 to 128:
// held at 64); the small ones left find no queue, and the limit grows
// again, to the maximum.
func TestAdaptiveLimitGrowsAgainWhenUnqueued(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	l := newAdaptiveLimit(256, clk.now, klog.Background())
	l.observeRTT(20 * time.Millisecond)
	queued := func(rtt time.Duration) {
		for range 5 {
			l.observeRTT(rtt)
		}
	}
	for range 6 {
		queued(100 * time.Millisecond)
		step(l, clk, func(l int) float64 { return float64(min(l, 64)) * 1e6 })
	}
	if got := l.current(); got != 64 {
		t.Fatalf("limit %d while the link was full, want 64", got)
	}
	for range 4 {
		queued(22 * time.Millisecond)
		step(l, clk, func(int) float64 { return 10e6 })
	}
	if got := l.current(); got != 256 {
		t.Fatalf("limit %d once the link had no queue, want 256", got)
	}
	// After a failure it never grows again.
	l.backOff(0)
	for range 4 {
		queued(22 * time.Millisecond)
		step(l, clk, func(int) float64 { return 10e6 })
	}
	if got := l.current(); got != 128 {
		t.Fatalf("limit %d after a failure, want 128", got)
	}
}

// The limit stays within what the source serves at once (its HTTP/2
// server's stream limit, its HTTP/1.1 connections), also when that is
// learned, or falls, after the growth began.
func TestAdaptiveLimitWithinSource(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	l := newAdaptiveLimit(256, clk.now, klog.Background())
	serves := 0 // unknown until the first response
	l.inFlight = func() int { return serves }
	linear := func(l int) float64 { return float64(l) * 1e6 }
	if got := step(l, clk, linear); got != 2*initialParallelism {
		t.Fatalf("limit %d with the source's limit unknown, want %d", got, 2*initialParallelism)
	}
	serves = 100
	for range 6 {
		step(l, clk, linear)
	}
	if got := l.current(); got != 100 {
		t.Fatalf("limit %d, the source serves 100 at once", got)
	}
	serves = 64 // another server behind the same name
	if got := step(l, clk, linear); got != 64 {
		t.Fatalf("limit %d, the source now serves 64 at once", got)
	}
}

func TestAdaptiveLimitGrowsOnlyWhenBound(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	l := newAdaptiveLimit(256, clk.now, klog.Background())
	for range 5 {
		clk.advance(minAdaptInterval)
		l.received.Add(1 << 20)
		l.mu.Lock()
		l.peak = 3
		l.adjustLocked()
		l.mu.Unlock()
	}
	if got := l.current(); got != initialParallelism {
		t.Fatalf("limit %d, want %d", got, initialParallelism)
	}
}

// A failure halves the limit and stops the growth; Retry-After holds new
// downloads back until it has passed.
func TestAdaptiveLimitBackOff(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	l := newAdaptiveLimit(256, clk.now, klog.Background())
	l.backOff(2 * time.Second)
	if got := l.current(); got != initialParallelism/2 {
		t.Fatalf("limit %d after a failure, want %d", got, initialParallelism/2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := l.acquire(ctx); err == nil {
		t.Fatal("a download started during the Retry-After pause")
	}
	clk.advance(2 * time.Second)
	if err := l.acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	l.release()
	if got := step(l, clk, func(l int) float64 { return float64(l) * 1e6 }); got != initialParallelism/2 {
		t.Fatalf("limit grew to %d after a failure", got)
	}
	for range 10 {
		l.backOff(0)
	}
	if got := l.current(); got != 1 {
		t.Fatalf("limit %d, want 1 at least", got)
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, c := range []struct {
		v    string
		want time.Duration
	}{
		{"", 0},
		{"3", 3 * time.Second},
		{" 120 ", 2 * time.Minute},
		{"-1", 0},
		{"1.5", 0},
		{"soon", 0},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{now.Add(-time.Hour).Format(http.TimeFormat), 0},
		{"99999999999999", 0},
	} {
		if got := parseRetryAfter(c.v, now); got != c.want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", c.v, got, c.want)
		}
	}
}

// A 503 with Retry-After makes the retry wait that long (the backoff
// alone would retry within milliseconds here).
func TestRetryAfterHonoured(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 31, 4, 3000)
	img := writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	obj := "/objects/" + cfs.VerityDigestOf(files[0].data).ObjectPath()
	var (
		mu    sync.Mutex
		times []time.Time
	)
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if r.URL.Path != obj {
			return false
		}
		mu.Lock()
		times = append(times, time.Now())
		mu.Unlock()
		if n == 1 {
			w.Header().Set("Retry-After", "1")
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return true
		}
		return false
	})
	s := openStore(t, t.TempDir(), testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "a.cfs"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.EnsureObjects(ctx, src, img); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(times) != 2 {
		t.Fatalf("%d requests of the object, want 2", len(times))
	}
	if gap := times[1].Sub(times[0]); gap < 900*time.Millisecond {
		t.Fatalf("retried after %v despite Retry-After: 1", gap)
	}
}

// A freed slot goes to the download that has waited longest, and only one
// waiter is woken for it (a broadcast woke them all, in no order).
func TestAdaptiveLimitWakesInOrder(t *testing.T) {
	l := newAdaptiveLimit(1, nil, klog.Background())
	ctx := context.Background()
	if err := l.acquire(ctx); err != nil {
		t.Fatal(err)
	}
	const n = 20
	got := make(chan int, n)
	for i := range n {
		go func() {
			if err := l.acquire(ctx); err != nil {
				t.Error(err)
			}
			got <- i
		}()
		// Queue them one after the other.
		for deadline := time.Now().Add(5 * time.Second); ; {
			l.mu.Lock()
			queued := len(l.waiters)
			l.mu.Unlock()
			if queued == i+1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("waiter %d never queued", i)
			}
			time.Sleep(time.Millisecond)
		}
	}
	for want := range n {
		l.release()
		if i := <-got; i != want {
			t.Fatalf("slot %d went to waiter %d", want, i)
		}
		l.mu.Lock()
		queued, woken := len(l.waiters), l.woken
		l.mu.Unlock()
		if queued != n-want-1 || woken != 0 {
			t.Fatalf("after slot %d: %d waiting, %d woken; want %d and 0", want, queued, woken, n-want-1)
		}
	}
	l.release()
}

// A woken waiter that leaves (its call cancelled) passes the wake-up on:
// no free slot is left while others wait.
func TestAdaptiveLimitLeavePassesWakeOn(t *testing.T) {
	l := newAdaptiveLimit(1, nil, klog.Background())
	a, b := make(chan struct{}, 1), make(chan struct{}, 1)
	l.mu.Lock()
	l.waiters = []chan struct{}{a, b}
	l.wakeLocked()
	l.mu.Unlock()
	if len(a) != 1 || len(b) != 0 {
		t.Fatalf("woken: first %d, second %d; want only the first", len(a), len(b))
	}
	l.leave(a)
	if len(b) != 1 {
		t.Fatal("the second waiter was not woken when the first left")
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.woken != 1 || len(l.waiters) != 0 {
		t.Fatalf("woken %d, waiting %d; want 1 and 0", l.woken, len(l.waiters))
	}
}

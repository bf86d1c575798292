package fetch

import (
	"context"
	"sync"
)

// flightGroup runs one call per key at a time and shares its result with
// every caller that asks for the same key meanwhile (like singleflight), but
// the work runs under its own context: it is cancelled only when every
// caller waiting for it has gone, so one cancelled CSI call does not fail a
// download that other volumes wait for.
type flightGroup[T any] struct {
	mu sync.Mutex
	m  map[string]*flight[T]
}

type flight[T any] struct {
	done    chan struct{}
	val     T
	err     error
	waiters int
	cancel  context.CancelCauseFunc
}

// do runs fn for key unless a call for key is in flight, and waits for the
// result or for ctx to end. shared tells whether another caller started it.
func (g *flightGroup[T]) do(ctx context.Context, key string, fn func(context.Context) (T, error)) (val T, shared bool, err error) {
	g.mu.Lock()
	if g.m == nil {
		g.m = make(map[string]*flight[T])
	}
	f, ok := g.m[key]
	if ok {
		f.waiters++
	} else {
		// The work keeps the caller's values (logger) but not its deadline.
		wctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
		f = &flight[T]{done: make(chan struct{}), waiters: 1, cancel: cancel}
		g.m[key] = f
		go func() {
			v, e := fn(wctx)
			g.mu.Lock()
			f.val, f.err = v, e
			if g.m[key] == f {
				delete(g.m, key)
			}
			g.mu.Unlock()
			cancel(nil)
			close(f.done)
		}()
	}
	g.mu.Unlock()

	select {
	case <-f.done:
		g.mu.Lock()
		f.waiters--
		g.mu.Unlock()
		return f.val, ok, f.err
	case <-ctx.Done():
		g.mu.Lock()
		f.waiters--
		last := f.waiters == 0
		if last {
			// Nobody wants it any more: stop it, and let a later caller
			// start afresh rather than join a dying call.
			f.cancel(context.Cause(ctx))
			if g.m[key] == f {
				delete(g.m, key)
			}
		}
		g.mu.Unlock()
		if last {
			// Wait for it to clean up (fn honours its context), and give
			// its error, which says what was being done.
			<-f.done
			if f.err != nil {
				return f.val, ok, f.err
			}
		}
		var zero T
		return zero, ok, context.Cause(ctx)
	}
}

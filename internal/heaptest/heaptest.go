// Package heaptest measures, for tests and benchmarks, how much the live
// heap grows while a function runs.
package heaptest

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// PeakLive runs fn and returns by how much the live heap grew at most
// meanwhile: sampled every 200µs from the last GC's count, with GC made
// frequent (GOGC 5) so that the samples follow the heap closely.
func PeakLive(fn func()) int64 {
	defer debug.SetGCPercent(debug.SetGCPercent(5))
	runtime.GC()
	sample := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	read := func() int64 { metrics.Read(sample); return int64(sample[0].Value.Uint64()) }
	base := read()
	stop, done := make(chan struct{}), make(chan int64)
	go func() {
		var top int64
		for {
			top = max(top, read())
			select {
			case <-stop:
				done <- top
				return
			case <-time.After(200 * time.Microsecond):
			}
		}
	}()
	fn()
	runtime.GC()
	close(stop)
	return <-done - base
}

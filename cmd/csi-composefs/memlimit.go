package main

import (
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
)

// The objects of a pull are fetched under a soft memory limit (unless
// GOMEMLIMIT sets one): the live heap once the image is parsed (its tree
// stays live) plus objectsHeadroom, at least objectsMemoryFloor. The
// downloads' buffers are short-lived (HTTP/2 bodies, copy buffers,
// hashers), so with the collector's default pacing the heap grew to twice
// what they held at once: bench/net measured a cold pull of 10,000 objects
// at 41-51 MiB of anonymous memory without the limit and 27 MiB with it
// (bench/README.md, RSS). The collector then runs more often, not longer:
// the heap it marks is small. The image phase is left alone, as parsing a
// large image needs its memory.
const (
	objectsHeadroom    = 24 << 20
	objectsMemoryFloor = 32 << 20
)

// limitObjectsMemory sets that limit and returns it (0: GOMEMLIMIT rules).
func limitObjectsMemory() int64 {
	if _, ok := os.LookupEnv("GOMEMLIMIT"); ok {
		return 0
	}
	runtime.GC() // the live heap of the parsed image, not the parse's garbage
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	var live int64
	if s[0].Value.Kind() == metrics.KindUint64 {
		live = int64(s[0].Value.Uint64())
	}
	limit := max(live+objectsHeadroom, objectsMemoryFloor)
	debug.SetMemoryLimit(limit)
	return limit
}

package suite

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// Case 3: 30 pods over 3 images that share most files, created at once:
// all run; the store holds each object once; each object was requested
// from the server once; a shared 64 MiB file read in every pod is cached
// once (the node's Cached grows by less than 2 × 64 MiB, not 30 ×).
func TestCase3SharedObjects(t *testing.T) {
	e := setup(t)
	ns := e.newNamespace(t)
	r := e.repo.newRepo(t, true)
	const big = 64 << 20
	seed := uint64(time.Now().UnixNano()) // content new to the node
	images := make([]string, 3)
	digests := make([]string, 3)
	trees := make([]*tree, 3)
	for i := range images {
		tr := newTree(t)
		tr.add(t, "shared/big.bin", randomBytes(seed, big))
		for j := 0; j < 60; j++ {
			tr.add(t, fmt.Sprintf("shared/lib/f%02d.so", j), randomBytes(seed+uint64(1+j), 20000+j*997))
		}
		for j := 0; j < 3; j++ {
			tr.add(t, fmt.Sprintf("own/%d-%d.dat", i, j), randomBytes(seed+uint64(1000*(i+1)+j), 30000))
		}
		tr.add(t, "name", []byte(fmt.Sprintf("image %d\n", i)))
		images[i], trees[i] = fmt.Sprintf("share-%d.cfs", i), tr
		digests[i] = r.build(t, e, images[i], tr.dir)
	}
	repoObjs := r.objectFiles(t)
	before := e.storeObjects(t)
	for o := range repoObjs {
		if _, ok := before[o]; ok {
			t.Fatalf("object %s already on the node: the case needs new content", o)
		}
	}

	const pods = 30
	start := time.Now()
	for i := 0; i < pods; i++ {
		img := i % 3
		e.createPod(t, ns, e.readerPod(fmt.Sprintf("share-%02d", i), e.inlineVolume("data", r.attrs(images[img], digests[img]))))
	}
	var slowest time.Duration
	for i := 0; i < pods; i++ {
		_, took := e.waitRunning(t, ns, fmt.Sprintf("share-%02d", i), 5*time.Minute)
		slowest = max(slowest, took)
	}
	report(t, "%d pods over 3 images created at once: all Running %s after the first create (slowest pod %s)",
		pods, time.Since(start).Round(100*time.Millisecond), slowest.Round(100*time.Millisecond))
	for i := 0; i < 3; i++ { // one pod of each image reads everything right
		e.verifyTree(t, ns, fmt.Sprintf("share-%02d", i), "/data", trees[i])
	}

	after := e.storeObjects(t)
	var added, dup int
	for o := range after {
		if _, ok := before[o]; !ok {
			added++
			if _, ok := repoObjs[o]; !ok {
				dup++
			}
		}
	}
	missing := 0
	for o, size := range repoObjs {
		if got, ok := after[o]; !ok || got != size {
			missing++
		}
	}
	if added != len(repoObjs) || dup != 0 || missing != 0 {
		t.Errorf("store gained %d object files (%d not in the repository, %d of the repository's missing or wrong size), want exactly the repository's %d",
			added, dup, missing, len(repoObjs))
	}
	total, maxPer, paths := r.requests("/objects/")
	if maxPer != 1 || paths != len(repoObjs) {
		t.Errorf("object requests: %d over %d paths, at most %d for one path; want each of the %d objects requested once", total, paths, maxPer, len(repoObjs))
	}
	imgReq, imgMax, _ := r.requests("/images/")
	report(t, "store: %d new object files for the %d distinct objects of the 3 images (one copy each); server: %d object GETs for %d objects (max %d per object), %d image GETs (max %d per image)",
		added, len(repoObjs), total, paths, maxPer, imgReq, imgMax)

	// Page cache: every pod reads the shared 64 MiB file.
	bigObj := ""
	for o, size := range repoObjs {
		if size == big {
			bigObj = o
		}
	}
	store := e.localStore()
	bestDelta := int64(-1)
	for attempt := 0; attempt < 3; attempt++ {
		evicted := int64(-1)
		if store != "" {
			evict(t, store, bigObj)
			evicted = residentKiB(t, filepath.Join(store, "objects", filepath.FromSlash(bigObj)))
		}
		// The same 30 execs without the read first: what exec itself (and
		// the rest of the node meanwhile) adds to the page cache is not
		// counted as the reads'.
		cachedBefore := e.meminfo(t, "Cached")
		execAll(t, e, ns, pods, "true")
		cachedMid := e.meminfo(t, "Cached")
		execAll(t, e, ns, pods, "cat /data/shared/big.bin > /dev/null")
		overhead := max(cachedMid-cachedBefore, 0)
		delta := e.meminfo(t, "Cached") - cachedMid - overhead
		resident := int64(-1)
		if store != "" {
			resident = residentKiB(t, filepath.Join(store, "objects", filepath.FromSlash(bigObj)))
		}
		report(t, "attempt %d: %d pods read the shared 64 MiB file: Cached +%d KiB beyond the %d KiB that as many execs without the read added (2 × 64 MiB = %d KiB; unshared would be %d KiB); the store's object had %d KiB in the page cache after eviction and %d KiB after the reads",
			attempt+1, pods, delta, overhead, 2*big/1024, pods*big/1024, evicted, resident)
		if bestDelta < 0 || delta < bestDelta {
			bestDelta = delta
		}
		if bestDelta < 2*big/1024 {
			break
		}
	}
	if store == "" {
		report(t, "node is not this host: the object could not be evicted first, so the page-cache check only bounds what the reads added")
	}
	if bestDelta >= 2*big/1024 {
		t.Errorf("reading a shared 64 MiB file in %d pods added %d KiB to the page cache (best of 3), want < %d KiB", pods, bestDelta, 2*big/1024)
	}
}

// execAll runs the shell command cmd in the pods share-00… at once and fails
// the test on the first error.
func execAll(t *testing.T, e *env, ns string, pods int, cmd string) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, pods)
	for i := 0; i < pods; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			if _, stderr, err := e.exec(ctx, ns, fmt.Sprintf("share-%02d", i), "/bin/sh", "-c", cmd); err != nil {
				errs <- fmt.Errorf("pod %d: %q: %v %s", i, cmd, err, stderr)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

package suite

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Chart values the upgrade cases change.
const (
	valStoreMaxSize = "store.maxSize"
	valGCInterval   = "store.gcInterval"
	valGCGrace      = "store.gcGrace"
	valLogLevel     = "logLevel"
)

// contentKiB is the disk use of the store's content (objects and images).
func (e *env) contentKiB(t *testing.T) int64 {
	t.Helper()
	var n int64
	for _, l := range strings.Split(strings.TrimSpace(e.nodeShell(t, `du -sk /store/objects /store/images 2>/dev/null || true`)), "\n") {
		if f := strings.Fields(l); len(f) == 2 {
			v, _ := strconv.ParseInt(f[0], 10, 64)
			n += v
		}
	}
	return n
}

// restoreRelease puts the release's values back as they were when the
// case started.
func (e *env) restoreRelease(t *testing.T) {
	t.Helper()
	rel := e.helmRelease()
	vals, err := rel.Values()
	if err != nil {
		t.Fatalf("helm get values: %v", err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		ds, err := e.daemonSet(ctx)
		if err != nil {
			t.Errorf("restoring the release: %v", err)
			return
		}
		if err := rel.Install(ctx, e.chart, vals); err != nil {
			t.Errorf("restoring the release: %v", err)
			return
		}
		if err := e.waitDaemonSetReady(ctx, ds.Generation); err != nil {
			t.Errorf("restoring the release: %v", err)
		}
	})
}

// Case 7: garbage collection under a small store.maxSize while pods come
// and go: no running pod loses a file, even while what they use exceeds
// the budget, and the store shrinks back under the budget once they are
// gone.
func TestCase7GarbageCollection(t *testing.T) {
	e := setup(t)
	e.restoreRelease(t)
	ns := e.newNamespace(t)
	r := e.repo.newRepo(t, true)
	const budgetMiB = 24
	// A short grace: images used within it are kept even when unused.
	e.helmUpgrade(t, fmt.Sprintf("%s=%dM", valStoreMaxSize, budgetMiB), valGCInterval+"=3s", valGCGrace+"=2s")
	report(t, "release upgraded: %s=%dM, %s=3s, %s=2s; store content now %d KiB", valStoreMaxSize, budgetMiB, valGCInterval, valGCGrace, e.contentKiB(t))

	seed := uint64(time.Now().UnixNano())
	trees := map[string]*tree{}
	attrs := map[string]map[string]string{}
	for i := 1; i <= 4; i++ {
		name := fmt.Sprintf("gc-%d", i)
		tr := newTree(t)
		tr.add(t, "a.bin", randomBytes(seed+uint64(10*i), 5<<20))
		tr.add(t, "b.bin", randomBytes(seed+uint64(10*i+1), 5<<20))
		tr.add(t, "name", []byte(name+"\n"))
		trees[name] = tr
		attrs[name] = r.attrs(name+".cfs", r.build(t, e, name+".cfs", tr.dir))
	}
	start := func(names ...string) {
		for _, n := range names {
			e.createPod(t, ns, e.readerPod(n, e.inlineVolume("data", attrs[n])))
		}
		for _, n := range names {
			e.waitRunning(t, ns, n, 2*time.Minute)
		}
	}
	verify := func(names ...string) {
		for _, n := range names {
			e.verifyTree(t, ns, n, "/data", trees[n])
		}
	}
	stop := func(names ...string) {
		ctx := context.Background()
		for _, n := range names {
			e.deletePod(t, ctx, ns, n)
		}
		for _, n := range names {
			if err := e.waitPodGone(ctx, ns, n); err != nil {
				t.Fatal(err)
			}
		}
	}
	budget := int64(budgetMiB << 10)
	start("gc-1", "gc-2")
	start("gc-3") // 30 MiB in use: over the budget
	time.Sleep(10 * time.Second)
	verify("gc-1", "gc-2", "gc-3")
	inUse := e.contentKiB(t)
	report(t, "3 pods use 30 MiB against a %d KiB budget: store content %d KiB after 3 GC periods; every file still right", budget, inUse)
	if inUse < 30<<10 {
		t.Errorf("store content %d KiB while 30 MiB are in use: GC removed content of running pods", inUse)
	}
	stop("gc-2")
	start("gc-4")
	time.Sleep(10 * time.Second)
	verify("gc-1", "gc-3", "gc-4")
	report(t, "gc-2 gone, gc-4 started: store content %d KiB; running pods' files right", e.contentKiB(t))
	stop("gc-1", "gc-3", "gc-4")
	t0 := time.Now()
	var last int64
	for time.Since(t0) < 2*time.Minute {
		if last = e.contentKiB(t); last <= budget {
			break
		}
		time.Sleep(2 * time.Second)
	}
	if last > budget {
		t.Errorf("store content %d KiB two minutes after the pods went, want <= %d KiB", last, budget)
	}
	report(t, "all pods gone: store content %d KiB (budget %d KiB) %s after the last pod went", last, budget, time.Since(t0).Round(time.Second))
}

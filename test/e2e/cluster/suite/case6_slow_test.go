package suite

import (
	"testing"
	"time"
)

// Case 6: a repository so slow that the fetch outlives kubelet's 2-minute
// NodePublishVolume call: the pod still starts once the background fetch
// completes, and the object is fetched once.
func TestCase6SlowRepository(t *testing.T) {
	e := setup(t)
	ns := e.newNamespace(t)
	r := e.repo.newRepo(t, true)
	const size, rate = 16 << 20, 112 << 10 // ≈ 146 s at the throttled rate
	tr := newTree(t)
	tr.add(t, "slow.bin", randomBytes(uint64(time.Now().UnixNano()), size))
	tr.add(t, "small.txt", []byte("small\n"))
	digest := r.build(t, e, "slow.cfs", tr.dir)

	e.repo.throttle(rate)
	defer e.repo.throttle(0)
	e.createPod(t, ns, e.readerPod("slow", e.inlineVolume("data", r.attrs("slow.cfs", digest))))
	_, took := e.waitRunning(t, ns, "slow", 8*time.Minute)
	e.repo.throttle(0)
	e.verifyTree(t, ns, "slow", "/data", tr)
	if took < 2*time.Minute {
		t.Errorf("pod Running after %s: the throttled fetch should have outlived kubelet's 2-minute call", took)
	}
	total, maxPer, paths := r.requests("/objects/")
	if maxPer != 1 {
		t.Errorf("object requests: %d over %d paths, at most %d for one; want each object fetched once", total, paths, maxPer)
	}
	var reasons []string
	for _, ev := range e.podEvents(ns, "slow") {
		if ev.Type == "Warning" {
			reasons = append(reasons, ev.Reason+": "+ev.Message)
		}
	}
	report(t, "16 MiB object at %d KiB/s: pod Running after %s; %d object GETs over %d objects (max %d per object); warnings on the pod meanwhile: %q",
		rate>>10, took.Round(time.Second), total, paths, maxPer, reasons)
}

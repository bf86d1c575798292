package suite

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Case 4: the driver pod is deleted and the DaemonSet recreates it while
// volumes are mounted: running pods keep reading, a new pod starts, and
// deleting the old pods unmounts cleanly.
func TestCase4DriverRestart(t *testing.T) {
	e := setup(t)
	ns := e.newNamespace(t)
	r := e.repo.newRepo(t, true)
	tr := sampleTree(t, 4)
	digest := r.build(t, e, "restart.cfs", tr.dir)
	e.createPod(t, ns, e.readerPod("before", e.inlineVolume("data", r.attrs("restart.cfs", digest))))
	before, _ := e.waitRunning(t, ns, "before", 2*time.Minute)

	// A reader loop in the pod for the whole restart: every read must give
	// the right bytes.
	sum := sha256.Sum256(tr.files["data/big.bin"])
	want := hex.EncodeToString(sum[:])
	type loopResult struct {
		out string
		err error
	}
	loop := make(chan loopResult, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	go func() {
		out, _, err := e.exec(ctx, ns, "before", "/bin/sh", "-c",
			`end=$(( $(date +%s) + 25 )); while [ $(date +%s) -lt $end ]; do sha256sum /data/data/big.bin || echo READ-FAILED; sleep 0.2; done`)
		loop <- loopResult{out, err}
	}()

	old, err := e.pluginPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := e.cs.CoreV1().Pods(old.Namespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("deleting the driver pod: %v", err)
	}
	var fresh string
	for time.Since(t0) < 3*time.Minute {
		p, err := e.pluginPod(ctx)
		if err == nil && p.UID != old.UID && allReady(p) {
			fresh = p.Name
			break
		}
		time.Sleep(300 * time.Millisecond)
	}
	if fresh == "" {
		t.Fatal("the DaemonSet did not recreate a ready driver pod within 3m")
	}
	if err := e.waitPluginRegistered(ctx); err != nil {
		t.Fatal(err)
	}
	report(t, "driver pod %s deleted; %s ready and registered %s later", old.Name, fresh, time.Since(t0).Round(100*time.Millisecond))

	res := <-loop
	if res.err != nil {
		t.Fatalf("reader loop during the restart: %v", res.err)
	}
	reads, bad := 0, 0
	for _, l := range strings.Split(strings.TrimSpace(res.out), "\n") {
		reads++
		if !strings.HasPrefix(l, want+" ") {
			bad++
		}
	}
	if bad > 0 || reads < 10 {
		t.Errorf("reader loop across the restart: %d reads, %d wrong or failed", reads, bad)
	}
	report(t, "running pod read a 3 MiB file %d times across the restart, %d wrong", reads, bad)
	e.verifyTree(t, ns, "before", "/data", tr)

	e.createPod(t, ns, e.readerPod("after", e.inlineVolume("data", r.attrs("restart.cfs", digest))))
	after, took := e.waitRunning(t, ns, "after", 2*time.Minute)
	e.verifyTree(t, ns, "after", "/data", tr)
	report(t, "new pod after the restart Running in %s", took.Round(time.Millisecond))

	for _, p := range []string{"before", "after"} {
		e.deletePod(t, ctx, ns, p)
	}
	for _, p := range []string{"before", "after"} {
		if err := e.waitPodGone(ctx, ns, p); err != nil {
			t.Fatalf("pod %s: %v", p, err)
		}
	}
	left := append(e.podMounts(t, string(before.UID)), e.podMounts(t, string(after.UID))...)
	if len(left) > 0 {
		t.Errorf("composefs mounts left on the node after the pods were deleted: %v", left)
	}
	report(t, "both pods deleted: %d composefs mounts of theirs left in the node's mountinfo", len(left))
	_ = fmt.Sprint()
}

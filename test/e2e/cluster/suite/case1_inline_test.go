package suite

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"time"
)

// sampleTree is a tree with what a reader can get wrong: nested folders,
// an empty file, small inline files, large external files, a symlink,
// duplicate content and names with spaces.
func sampleTree(t *testing.T, seed uint64) *tree {
	tr := newTree(t)
	tr.add(t, "etc/motd", []byte("hello from composefs\n"))
	tr.add(t, "empty", nil)
	tr.add(t, "name with spaces.txt", []byte("spaces\n"))
	for i := 0; i < 40; i++ {
		tr.add(t, fmt.Sprintf("data/%02d/file-%d.bin", i%7, i), randomBytes(seed+uint64(i), 1000+i*4099))
	}
	tr.add(t, "data/big.bin", randomBytes(seed+1000, 3<<20+17))
	tr.add(t, "data/copy-of-big.bin", randomBytes(seed+1000, 3<<20+17))
	tr.link(t, "motd-link", "etc/motd")
	return tr
}

// verifyTree checks every file the pod sees under dir against the tree:
// the same set of regular files with the same sha256, and the symlinks.
// It returns the number of files and bytes checked.
func (e *env) verifyTree(t *testing.T, ns, pod, dir string, tr *tree) (int, int64) {
	t.Helper()
	out := e.mustExec(t, ns, pod, fmt.Sprintf(`cd %s && find . -type f -exec sha256sum {} + && find . -type l -exec sh -c 'for l; do echo "link $(readlink "$l") $l"; done' _ {} +`, dir))
	got := map[string]string{}
	links := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if rest, ok := strings.CutPrefix(l, "link "); ok {
			target, name, _ := strings.Cut(rest, " ./")
			links[name] = target
			continue
		}
		sum, name, ok := strings.Cut(l, "  ./")
		if !ok {
			t.Fatalf("unexpected line %q", l)
		}
		got[name] = sum
	}
	var bad []string
	var n int64
	for name, data := range tr.files {
		s := sha256.Sum256(data)
		if got[name] != hex.EncodeToString(s[:]) {
			bad = append(bad, fmt.Sprintf("%s: got %q", name, got[name]))
		}
		n += int64(len(data))
		delete(got, name)
	}
	for name := range got {
		bad = append(bad, name+": not in the source tree")
	}
	for name, target := range tr.links {
		if links[name] != target {
			bad = append(bad, fmt.Sprintf("symlink %s -> %q, want %q", name, links[name], target))
		}
	}
	sort.Strings(bad)
	if len(bad) > 0 {
		t.Fatalf("pod %s/%s reads wrong content under %s:\n%s", ns, pod, dir, strings.Join(bad, "\n"))
	}
	return len(tr.files), n
}

// Case 1: an inline ephemeral volume reads every file right, is read-only
// (EROFS) and mounted ro,nodev,nosuid in the container.
func TestCase1InlineVolume(t *testing.T) {
	e := setup(t)
	ns := e.newNamespace(t)
	r := e.repo.newRepo(t, true)
	tr := sampleTree(t, 1)
	digest := r.build(t, e, "sample.cfs", tr.dir)

	// As the README's examples: the volume is read-only by construction,
	// so neither the volume nor the mount says readOnly. A second mount of
	// the same volume says readOnly: the runtime then remounts its bind
	// read-only with exactly that flag, dropping nosuid and nodev (runc
	// does so in every version); reported, not required.
	p := e.readerPod("inline", e.inlineVolume("data", r.attrs("sample.cfs", digest)))
	p.Spec.Volumes[0].CSI.ReadOnly = nil
	c := &p.Spec.Containers[0]
	c.VolumeMounts[0].ReadOnly = false
	c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "data", MountPath: "/data-ro", ReadOnly: true})
	e.createPod(t, ns, p)
	pod, took := e.waitRunning(t, ns, "inline", 2*time.Minute)
	for _, m := range e.podMountInfo(t, string(pod.UID)) {
		report(t, "node mount %s: %s %s", m.point[strings.Index(m.point, "/pods/"):], m.fstype, m.opts)
	}
	files, n := e.verifyTree(t, ns, "inline", "/data", tr)
	report(t, "pod Running %s after create; %d files (%d bytes) and %d symlink match sha256", took.Round(time.Millisecond), files, n, len(tr.links))

	out := e.mustExec(t, ns, "inline", `touch /data/new 2>&1; echo "exit=$?"; mkdir /data/etc/x 2>&1; echo "exit=$?"`)
	if strings.Count(out, "Read-only file system") != 2 || strings.Contains(out, "exit=0") {
		t.Errorf("writes into the volume: %q, want both to fail with EROFS", out)
	}
	report(t, "writes refused: %s", strings.Join(strings.Fields(strings.ReplaceAll(out, "\n", "; ")), " "))

	line := strings.TrimSpace(e.mustExec(t, ns, "inline", `grep ' /data ' /proc/mounts`))
	f := strings.Fields(line)
	if len(f) < 4 {
		t.Fatalf("/proc/mounts line for /data: %q", line)
	}
	opts := map[string]bool{}
	for _, o := range strings.Split(f[3], ",") {
		opts[o] = true
	}
	for _, want := range []string{"ro", "nodev", "nosuid"} {
		if !opts[want] {
			t.Errorf("container mount of /data has options %s, missing %s", f[3], want)
		}
	}
	report(t, "container sees /data as %s %s", f[2], onlyFlags(f[3]))
	ro := strings.Fields(e.mustExec(t, ns, "inline", `grep ' /data-ro ' /proc/mounts`))
	if len(ro) >= 4 {
		report(t, "the same volume mounted with readOnly: true is %s %s (the runtime's read-only remount)", ro[2], onlyFlags(ro[3]))
	}
}

// onlyFlags keeps the generic mount flags of an option list (not the
// overlay's layer paths).
func onlyFlags(opts string) string {
	var keep []string
	for _, o := range strings.Split(opts, ",") {
		if !strings.Contains(o, "=") {
			keep = append(keep, o)
		}
	}
	return strings.Join(keep, ",")
}

package cfs

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// bigImage writes an image of 50 directories of 1000 entries each (50,050
// entries): inline files, external files and symlinks.
func bigImage(b *testing.B, path string) int {
	b.Helper()
	root := &Node{Mode: ModeDir | 0o755, Nlink: 52, Mtime: Timespec{Sec: 1700000000}}
	entries := 0
	for d := range 50 {
		dir := &Node{Name: fmt.Sprintf("dir-%02d", d), Mode: ModeDir | 0o755, Nlink: 2, Mtime: root.Mtime}
		if err := root.AddChild(dir); err != nil {
			b.Fatal(err)
		}
		entries++
		for f := range 1000 {
			n := &Node{Name: fmt.Sprintf("file-%04d", f), Mode: ModeRegular | 0o644, Nlink: 1, Mtime: root.Mtime}
			switch f % 3 {
			case 0:
				n.Content = []byte(fmt.Sprintf("inline %d/%d\n", d, f))
				n.Size = uint64(len(n.Content))
			case 1:
				dg := VerityDigestOf([]byte(fmt.Sprintf("object %d/%d", d, f)))
				n.Size, n.Payload, n.Digest = 10000, dg.ObjectPath(), &dg
			case 2:
				n.Mode, n.Payload = ModeSymlink|0o777, "../dir-00/file-0000"
				n.Size = uint64(len(n.Payload))
			}
			if err := dir.AddChild(n); err != nil {
				b.Fatal(err)
			}
			entries++
		}
	}
	if _, err := WriteImageFile(path, root, DefaultWriteOptions()); err != nil {
		b.Fatal(err)
	}
	return entries
}

// BenchmarkMount50k measures mounting and unmounting a 50,000-entry image;
// it reports the median and 99th percentile of each step. Every iteration
// does 20 mount/unmount cycles so that percentiles have samples.
func BenchmarkMount50k(b *testing.B) {
	requireRoot(b)
	dir := b.TempDir()
	image := filepath.Join(dir, "big.cfs")
	entries := bigImage(b, image)
	st, _ := os.Stat(image)
	b.Logf("image: %d entries, %d KiB", entries, st.Size()>>10)
	store := filepath.Join(dir, "objects")
	if err := os.Mkdir(store, 0o755); err != nil {
		b.Fatal(err)
	}
	for _, legacy := range []bool{false, true} {
		name := "new-api"
		if legacy {
			name = "legacy"
		}
		b.Run(name, func(b *testing.B) {
			target := filepath.Join(b.TempDir(), "mnt")
			if err := os.Mkdir(target, 0o755); err != nil {
				b.Fatal(err)
			}
			cleanupMount(b, target)
			var mounts, unmounts []time.Duration
			for b.Loop() {
				for range 20 {
					t0 := time.Now()
					if _, err := Mount(b.Context(), image, target, MountOptions{ObjectDirs: []string{store}, ForceLegacy: legacy}); err != nil {
						b.Fatal(err)
					}
					t1 := time.Now()
					if err := Unmount(target, false); err != nil {
						b.Fatal(err)
					}
					t2 := time.Now()
					mounts = append(mounts, t1.Sub(t0))
					unmounts = append(unmounts, t2.Sub(t1))
				}
			}
			b.ReportMetric(percentile(mounts, 50), "mount-p50-µs")
			b.ReportMetric(percentile(mounts, 99), "mount-p99-µs")
			b.ReportMetric(percentile(unmounts, 50), "umount-p50-µs")
			b.ReportMetric(percentile(unmounts, 99), "umount-p99-µs")
		})
	}
}

// percentile returns the p-th percentile of ds in microseconds (nearest rank).
func percentile(ds []time.Duration, p int) float64 {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	i = min(max(i-1, 0), len(s)-1)
	return float64(s[i].Nanoseconds()) / 1e3
}

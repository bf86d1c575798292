package driver

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// bigImage writes an image of entries files backed by objects distinct
// objects into the repository, returning its digest.
func (r *testRepo) bigImage(tb testing.TB, name string, entries, objects int) cfs.Digest {
	tb.Helper()
	var dump strings.Builder
	dump.WriteString("/ 0 40755 2 0 0 0 0.0 - - -\n")
	digests := make([]cfs.Digest, objects)
	sizes := make([]int, objects)
	for i := range digests {
		data := []byte(strings.Repeat(fmt.Sprintf("object %d ", i), 20))
		digests[i], sizes[i] = cfs.VerityDigestOf(data), len(data)
		p := filepath.Join(r.dir, "objects", digests[i].ObjectPath())
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	perDir := 1000
	for i := 0; i < entries; i++ {
		if i%perDir == 0 {
			fmt.Fprintf(&dump, "/d%03d 0 40755 2 0 0 0 0.0 - - -\n", i/perDir)
		}
		o := i % objects
		fmt.Fprintf(&dump, "/d%03d/f%06d %d 100644 1 0 0 0 0.0 %s - %s\n", i/perDir, i, sizes[o], digests[o].ObjectPath(), digests[o])
	}
	root, err := cfs.ParseDump(strings.NewReader(dump.String()), cfs.DumpOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(r.dir, "images"), 0o755); err != nil {
		tb.Fatal(err)
	}
	d, err := cfs.WriteImageFile(filepath.Join(r.dir, "images", name), root, cfs.DefaultWriteOptions())
	if err != nil {
		tb.Fatal(err)
	}
	return d
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[int(float64(len(s)-1)*p)]
}

// BenchmarkPublish drives the node server over gRPC on a unix socket:
// one cold publish (image and objects fetched from a loopback repository)
// then 200 warm publishes of the same image to new targets, and 200
// unpublishes; p50/p99 are reported. Run with -benchtime=1x.
func BenchmarkPublish(b *testing.B) {
	needRoot(b)
	for _, size := range []struct {
		name             string
		entries, objects int
	}{{"entries=100", 100, 50}, {"entries=50000", 50000, 2000}} {
		b.Run(size.name, func(b *testing.B) {
			repo := newTestRepo(b)
			dg := repo.bigImage(b, "img", size.entries, size.objects)
			for n := 0; n < b.N; n++ {
				benchPublishOnce(b, repo, dg)
			}
		})
	}
}

func benchPublishOnce(b *testing.B, repo *testRepo, dg cfs.Digest) {
	e := newTestEnv(b, Config{})
	dir := b.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	l, err := Listen("unix://" + sock)
	if err != nil {
		b.Fatal(err)
	}
	gs := e.d.NewGRPCServer()
	go func() { _ = gs.Serve(l) }()
	defer gs.Stop()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	node := csi.NewNodeClient(conn)
	ctx := context.Background()
	vc := map[string]string{"repository": repo.srv.URL, "image": "img", "digest": dg.String()}
	const n = 200
	targets := make([]string, n+1)
	for i := range targets {
		targets[i] = filepath.Join(dir, fmt.Sprintf("pod%03d", i), "vol")
		cleanupMounts(b, targets[i])
	}
	b.ResetTimer()
	t0 := time.Now()
	if _, err := node.NodePublishVolume(ctx, publishReq("cold", targets[n], vc)); err != nil {
		b.Fatal(err)
	}
	cold := time.Since(t0)
	warm := make([]time.Duration, n)
	for i := 0; i < n; i++ {
		t0 := time.Now()
		if _, err := node.NodePublishVolume(ctx, publishReq(fmt.Sprintf("v%d", i), targets[i], vc)); err != nil {
			b.Fatal(err)
		}
		warm[i] = time.Since(t0)
	}
	unpub := make([]time.Duration, n)
	for i := 0; i < n; i++ {
		t0 := time.Now()
		if _, err := node.NodeUnpublishVolume(ctx, unpublishReq(fmt.Sprintf("v%d", i), targets[i])); err != nil {
			b.Fatal(err)
		}
		unpub[i] = time.Since(t0)
	}
	b.StopTimer()
	if _, err := node.NodeUnpublishVolume(ctx, unpublishReq("cold", targets[n])); err != nil {
		b.Fatal(err)
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(cold), "cold-ms")
	b.ReportMetric(ms(percentile(warm, .5)), "warm-p50-ms")
	b.ReportMetric(ms(percentile(warm, .99)), "warm-p99-ms")
	b.ReportMetric(ms(percentile(unpub, .5)), "unpub-p50-ms")
	b.ReportMetric(ms(percentile(unpub, .99)), "unpub-p99-ms")
}

// BenchmarkMountDesign compares the two ways of giving N targets one
// image: a composefs mount (erofs + overlay) per target, which is what
// the driver does, against one shared composefs mount per image
// bind-mounted into each target. Both mount and unmount 200 targets.
func BenchmarkMountDesign(b *testing.B) {
	needRoot(b)
	repo := newTestRepo(b)
	dg := repo.bigImage(b, "img", 50000, 2000)
	e := newTestEnv(b, Config{})
	spec := SourceSpec{SourceHTTP, repo.srv.URL}
	src, err := NewSource(spec, Credentials{})
	if err != nil {
		b.Fatal(err)
	}
	if _, _, err := e.d.fetch(context.Background(), VolumeSpec{Source: spec, Ref: fetch.ImageRef{Name: "img", Digest: dg},
		PullPolicy: PullIfNotPresent}, src, "", new(fetch.Progress)); err != nil {
		b.Fatal(err)
	}
	image := e.store.ImagePath(dg)
	opts := cfs.MountOptions{ObjectDirs: []string{e.store.ObjectsDir()}, Verity: cfs.VerityOff, ImageDigest: &dg}
	const n = 200
	mkTargets := func() []string {
		dir := b.TempDir()
		ts := make([]string, n)
		for i := range ts {
			ts[i] = filepath.Join(dir, fmt.Sprint(i))
			if err := os.Mkdir(ts[i], 0o755); err != nil {
				b.Fatal(err)
			}
			cleanupMounts(b, ts[i])
		}
		return ts
	}
	report := func(b *testing.B, mount, umount []time.Duration) {
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		b.ReportMetric(ms(percentile(mount, .5)), "mount-p50-ms")
		b.ReportMetric(ms(percentile(mount, .99)), "mount-p99-ms")
		b.ReportMetric(ms(percentile(umount, .5)), "umount-p50-ms")
	}
	b.Run("per-target", func(b *testing.B) {
		for it := 0; it < b.N; it++ {
			ts := mkTargets()
			mt, ut := make([]time.Duration, n), make([]time.Duration, n)
			for i, tg := range ts {
				t0 := time.Now()
				if _, err := cfs.Mount(context.Background(), image, tg, opts); err != nil {
					b.Fatal(err)
				}
				mt[i] = time.Since(t0)
			}
			for i, tg := range ts {
				t0 := time.Now()
				if err := cfs.Unmount(tg, false); err != nil {
					b.Fatal(err)
				}
				ut[i] = time.Since(t0)
			}
			report(b, mt, ut)
		}
	})
	b.Run("shared+bind", func(b *testing.B) {
		for it := 0; it < b.N; it++ {
			shared := filepath.Join(b.TempDir(), "shared")
			if err := os.Mkdir(shared, 0o755); err != nil {
				b.Fatal(err)
			}
			cleanupMounts(b, shared)
			if _, err := cfs.Mount(context.Background(), image, shared, opts); err != nil {
				b.Fatal(err)
			}
			ts := mkTargets()
			mt, ut := make([]time.Duration, n), make([]time.Duration, n)
			for i, tg := range ts {
				t0 := time.Now()
				if err := unix.Mount(shared, tg, "", unix.MS_BIND, ""); err != nil {
					b.Fatal(err)
				}
				if err := unix.Mount("", tg, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NODEV|unix.MS_NOSUID, ""); err != nil {
					b.Fatal(err)
				}
				mt[i] = time.Since(t0)
			}
			for i, tg := range ts {
				t0 := time.Now()
				if err := cfs.Unmount(tg, false); err != nil {
					b.Fatal(err)
				}
				ut[i] = time.Since(t0)
			}
			if err := cfs.Unmount(shared, false); err != nil {
				b.Fatal(err)
			}
			report(b, mt, ut)
		}
	})
}

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
// unpublishes; p50/p99 are reported. The warm publishes alternate between
// the default isolation (the principal that fetched the content publishes
// it again: provenance is checked) and --trust-shared-content (no check at
// all: the baseline), under the same conditions; the ratio of their p50
// (isolated/trusted; 1 means isolation costs a warm publish nothing) is
// reported, and likewise for the cold publish (measured in fresh
// environments in the order trusted, isolated, isolated, trusted, so that
// a warming page cache favours neither). Run with -benchtime=1x.
func BenchmarkPublish(b *testing.B) {
	needRoot(b)
	for _, size := range []struct {
		name             string
		entries, objects int
	}{{"entries=100", 100, 50}, {"entries=50000", 50000, 2000}} {
		b.Run(size.name, func(b *testing.B) {
			repo := newTestRepo(b)
			dg := repo.bigImage(b, "img", size.entries, size.objects)
			var t publishTimes
			var coldTrusted, coldIsolated time.Duration
			for n := 0; n < b.N; n++ {
				trusted, isolated := Config{TrustSharedContent: true}, Config{}
				coldTrusted += benchPublishOnce(b, repo, dg, trusted, 0, false).cold
				t = benchPublishOnce(b, repo, dg, isolated, 200, true)
				coldIsolated += t.cold
				coldIsolated += benchPublishOnce(b, repo, dg, isolated, 0, false).cold
				coldTrusted += benchPublishOnce(b, repo, dg, trusted, 0, false).cold
			}
			ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
			b.ReportMetric(ms(t.cold), "cold-ms")
			b.ReportMetric(ms(percentile(t.warm, .5)), "warm-p50-ms")
			b.ReportMetric(ms(percentile(t.warm, .99)), "warm-p99-ms")
			b.ReportMetric(ms(percentile(t.unpub, .5)), "unpub-p50-ms")
			b.ReportMetric(ms(percentile(t.unpub, .99)), "unpub-p99-ms")
			b.ReportMetric(ms(percentile(t.warmTrusted, .5)), "trusted-warm-p50-ms")
			b.ReportMetric(float64(percentile(t.warm, .5))/float64(percentile(t.warmTrusted, .5)), "warm-p50-isolated/trusted")
			b.ReportMetric(float64(coldIsolated)/float64(coldTrusted), "cold-isolated/trusted")
		})
	}
}

type publishTimes struct {
	cold                     time.Duration
	warm, warmTrusted, unpub []time.Duration
}

// benchPublishOnce publishes cold, then n warm, then unpublishes; with
// alternate, every other warm publish runs with TrustSharedContent.
func benchPublishOnce(b *testing.B, repo *testRepo, dg cfs.Digest, cfg Config, n int, alternate bool) publishTimes {
	e := newTestEnv(b, cfg)
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
	var res publishTimes
	res.cold = time.Since(t0)
	for i := 0; i < n; i++ {
		// Set between calls only (benchmarks do not run with -race).
		trust := cfg.TrustSharedContent || alternate && i%2 == 0
		e.d.cfg.TrustSharedContent = trust
		t0 := time.Now()
		if _, err := node.NodePublishVolume(ctx, publishReq(fmt.Sprintf("v%d", i), targets[i], vc)); err != nil {
			b.Fatal(err)
		}
		if trust {
			res.warmTrusted = append(res.warmTrusted, time.Since(t0))
		} else {
			res.warm = append(res.warm, time.Since(t0))
		}
	}
	e.d.cfg.TrustSharedContent = cfg.TrustSharedContent
	for i := 0; i < n; i++ {
		t0 := time.Now()
		if _, err := node.NodeUnpublishVolume(ctx, unpublishReq(fmt.Sprintf("v%d", i), targets[i])); err != nil {
			b.Fatal(err)
		}
		res.unpub = append(res.unpub, time.Since(t0))
	}
	b.StopTimer()
	if _, err := node.NodeUnpublishVolume(ctx, unpublishReq("cold", targets[n])); err != nil {
		b.Fatal(err)
	}
	b.StartTimer()
	return res
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

// BenchmarkWarmFetch times what a warm publish does before mounting (the
// fetch step, where provenance is checked), alternating trusted and
// isolated calls for the same principal, and reports both and their ratio:
// the mount that follows (milliseconds) is the same in both modes.
func BenchmarkWarmFetch(b *testing.B) {
	repo := newTestRepo(b)
	dg := repo.bigImage(b, "img", 50000, 2000)
	e := newTestEnv(b, Config{})
	spec := VolumeSpec{Source: SourceSpec{SourceHTTP, repo.srv.URL}, Ref: fetch.ImageRef{Name: "img", Digest: dg}, PullPolicy: PullIfNotPresent}
	src, err := NewSource(spec.Source, Credentials{})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	run := func(trust bool) time.Duration {
		e.d.cfg.TrustSharedContent = trust
		t0 := time.Now()
		if _, _, err := e.d.fetch(ctx, spec, src, "", new(fetch.Progress)); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	run(false) // cold
	run(true)  // marks the image complete for the trusted mode too
	before := repo.requests("/")
	b.ResetTimer()
	var trusted, isolated time.Duration
	for i := 0; i < b.N; i++ {
		trusted += run(true)
		isolated += run(false)
	}
	b.StopTimer()
	if n := repo.requests("/") - before; n != 0 {
		b.Fatalf("%d requests during warm fetches", n)
	}
	b.ReportMetric(float64(trusted.Nanoseconds())/float64(b.N), "trusted-ns/fetch")
	b.ReportMetric(float64(isolated.Nanoseconds())/float64(b.N), "isolated-ns/fetch")
	b.ReportMetric(float64(isolated)/float64(trusted), "isolated/trusted")
}

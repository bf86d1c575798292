package fetch

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// coldPullRepo serves 2,000 files (~100 MiB) from a loopback server.
func coldPullRepo(b *testing.B) (src *HTTPSource, d cfs.Digest, total int64) {
	repo := b.TempDir()
	files := makeFiles("f", 91, 2000, 100000)
	d = writeRepoImage(b, repo, "img.cfs", files)
	for _, f := range files {
		total += int64(len(f.data))
	}
	ts := newTestServer(b, repo)
	return newSource(b, ts.URL, HTTPOptions{}), d, total
}

// coldPull pulls the image into a new store at root and returns how long
// the pull took; the benchmark's timer runs only meanwhile (not while the
// store is removed and opened).
func coldPull(b *testing.B, src Source, d cfs.Digest, root string, opts Options) time.Duration {
	b.Helper()
	os.RemoveAll(root)
	s, err := Open(context.Background(), root, opts)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	b.StartTimer()
	defer b.StopTimer()
	start := time.Now()
	if _, err := s.EnsureImage(context.Background(), src, ImageRef{Name: "img.cfs"}); err != nil {
		b.Fatal(err)
	}
	if _, err := s.EnsureObjects(context.Background(), src, d); err != nil {
		b.Fatal(err)
	}
	return time.Since(start)
}

// BenchmarkColdPull pulls 2,000 files (~100 MiB) from a loopback server
// into an empty store: go test -run '^$' -bench ColdPull -cpuprofile cpu.out
func BenchmarkColdPull(b *testing.B) {
	src, d, total := coldPullRepo(b)
	dir := b.TempDir()
	b.SetBytes(total)
	b.ResetTimer()
	b.StopTimer()
	for i := range b.N {
		coldPull(b, src, d, filepath.Join(dir, "store", string(rune('a'+i%26))), Options{})
	}
}

// BenchmarkColdPullBudgets measures the node-wide budgets' cost on a
// normal pull: each iteration pulls the same image cold with the default
// budgets and without any (download budget, parse memory, object size and
// free-space checks off), in alternating order, and reports the ratio of
// the totals (goal: 1.0 within noise):
// go test -run '^$' -bench ColdPullBudgets -benchtime 5x ./pkg/fetch
func BenchmarkColdPullBudgets(b *testing.B) {
	src, d, total := coldPullRepo(b)
	dir := b.TempDir()
	none := Options{DownloadBudget: -1, ParseMemory: -1, MaxObjectSize: -1, MinFreeSpace: -1}
	var with, without time.Duration
	b.SetBytes(2 * total)
	b.ResetTimer()
	b.StopTimer()
	for i := range b.N {
		root := filepath.Join(dir, "store")
		if i%2 == 0 {
			with += coldPull(b, src, d, root, Options{})
			without += coldPull(b, src, d, root, none)
		} else {
			without += coldPull(b, src, d, root, none)
			with += coldPull(b, src, d, root, Options{})
		}
	}
	b.ReportMetric(float64(with.Milliseconds())/float64(b.N), "ms/pull-budgets")
	b.ReportMetric(float64(without.Milliseconds())/float64(b.N), "ms/pull-none")
	b.ReportMetric(with.Seconds()/without.Seconds(), "budgets/none")
}

package fetch

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkColdPull pulls 2,000 files (~100 MiB) from a loopback server
// into an empty store: go test -run '^$' -bench ColdPull -cpuprofile cpu.out
func BenchmarkColdPull(b *testing.B) {
	repo := b.TempDir()
	files := makeFiles("f", 91, 2000, 100000)
	d := writeRepoImage(b, repo, "img.cfs", files)
	var total int64
	for _, f := range files {
		total += int64(len(f.data))
	}
	ts := newTestServer(b, repo)
	src := newSource(b, ts.URL, HTTPOptions{})
	dir := b.TempDir()
	b.SetBytes(total)
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		root := filepath.Join(dir, "store", string(rune('a'+i%26)))
		os.RemoveAll(root)
		s, err := Open(context.Background(), root, Options{})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, err := s.EnsureImage(context.Background(), src, ImageRef{Name: "img.cfs"}); err != nil {
			b.Fatal(err)
		}
		if _, err := s.EnsureObjects(context.Background(), src, d); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		s.Close()
	}
}

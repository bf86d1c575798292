package fetch

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/pack"
)

// writeTree writes files into a new directory.
func writeTree(t testing.TB, files []testFile) string {
	t.Helper()
	dir := t.TempDir()
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f.name), f.data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// publishPacked publishes files as image name into repo with packs.
func publishPacked(t testing.TB, repo, name string, files []testFile, opts ...PublishOption) cfs.Digest {
	t.Helper()
	if opts == nil {
		opts = []PublishOption{WithPacks(PackOptions{})}
	}
	d, err := PublishImage(context.Background(), writeTree(t, files), repo, name, cfs.DirOptions{UseEpoch: true}, cfs.DefaultWriteOptions(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// hitsUnder counts the requests of paths under prefix.
func (ts *testServer) hitsUnder(prefix string) int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	n := 0
	for k, v := range ts.hits {
		if strings.HasPrefix(k, prefix) {
			n += v
		}
	}
	return n
}

// byteCounter is a fault that serves every file itself, counting the body
// bytes of packs/*.tar and objects/ it sends.
type byteCounter struct {
	ts   *testServer
	sent atomic.Int64
}

func (bc *byteCounter) fault(w http.ResponseWriter, r *http.Request, _ int) bool {
	if strings.HasSuffix(r.URL.Path, ".tar") || strings.HasPrefix(r.URL.Path, "/objects/") {
		http.ServeFile(countingWriter{w, &bc.sent}, r, filepath.Join(bc.ts.dir, filepath.FromSlash(r.URL.Path)))
		return true
	}
	return false
}

func packFiles(t testing.TB, repo, suffix string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(repo, "packs", "*"+suffix))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func readRepoIndex(t testing.TB, repo string, d cfs.Digest) *pack.RepoIndex {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repo, "packs", PackIndexName(d)))
	if err != nil {
		t.Fatal(err)
	}
	x, err := pack.DecodeRepoIndex(b)
	if err != nil {
		t.Fatal(err)
	}
	return x
}

// TestPackedPullFewRequests: a cold pull of many small objects from a
// packed repository makes a few range requests of the packs, plus one
// request per object too large to be packed, each from objects/.
func TestPackedPullFewRequests(t *testing.T) {
	files := makeFiles("s", 1, 400, 8<<10)
	for i := range 3 {
		files = append(files, testFile{name: "big" + string(rune('a'+i)), data: content(uint64(90+i), 1<<20+4096)})
	}
	repo := t.TempDir()
	d := publishPacked(t, repo, "app.cfs", files)
	if x := readRepoIndex(t, repo, d); x.Image != d || len(x.Index.Entries) != 400 {
		t.Fatalf("pack index for %s lists %d objects, want 400 (the big ones are not packed)", x.Image, len(x.Index.Entries))
	}
	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	mustPull(t, s, newSource(t, ts.URL, HTTPOptions{}), "app.cfs")
	if !hasObjects(t, root, files) {
		t.Fatal("objects missing after the pull")
	}
	checkInvariant(t, root)
	objReqs, packReqs := ts.hitsUnder("/objects/"), ts.hitsUnder("/packs/")
	t.Logf("%d objects: %d requests of objects/, %d of packs/", len(files), objReqs, packReqs)
	if objReqs != 3 {
		t.Errorf("%d requests of objects/, want 3 (the objects larger than the pack limit)", objReqs)
	}
	if packReqs < 2 || packReqs > 5 {
		t.Errorf("%d requests of packs/, want the index and a few runs", packReqs)
	}
}

// TestPackedWarmPullAndReuse: a second image sharing 90 % of the first's
// objects, built into the same repository, reuses the first's pack and
// packs only its new objects; a node holding the first pulls the second
// moving at most 1.05 times the bytes of the objects it lacks.
func TestPackedWarmPullAndReuse(t *testing.T) {
	v1 := makeFiles("f", 2, 200, 128<<10)
	v2 := append([]testFile(nil), v1...)
	var newBytes int64
	for i := 0; i < len(v2); i += 10 {
		v2[i].data = content(uint64(7000+i), len(v2[i].data))
		newBytes += int64(len(v2[i].data))
	}
	repo := t.TempDir()
	d1 := publishPacked(t, repo, "app-1.cfs", v1)
	packs1 := packFiles(t, repo, ".tar")
	d2 := publishPacked(t, repo, "app-2.cfs", v2)
	packs2 := packFiles(t, repo, ".tar")

	// The build: the first image's packs are named by the second's index,
	// and the new packs hold about the new objects only.
	x2 := readRepoIndex(t, repo, d2)
	reused := 0
	for _, p := range x2.Packs {
		for _, f := range packs1 {
			if filepath.Base(f) == p.Name() {
				reused++
			}
		}
	}
	if reused != len(packs1) {
		t.Errorf("the second index names %d of the first image's %d packs", reused, len(packs1))
	}
	var added int64
	for _, f := range packs2 {
		if !strings.Contains(strings.Join(packs1, " "), f) {
			fi, _ := os.Stat(f)
			added += fi.Size()
		}
	}
	if float64(added) > 1.15*float64(newBytes) {
		t.Errorf("the second build wrote %d bytes of packs for %d bytes of new objects", added, newBytes)
	}

	ts := newTestServer(t, repo)
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	if got := mustPull(t, s, src, "app-1.cfs"); got != d1 {
		t.Fatal(got)
	}
	bc := &byteCounter{ts: ts}
	ts.setFault(bc.fault)
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "app-2.cfs", Digest: d2}); err != nil {
		t.Fatal(err)
	}
	st, err := s.EnsureObjects(ctx, src, d2)
	if err != nil {
		t.Fatal(err)
	}
	if st.Fetched != 20 {
		t.Errorf("fetched %d objects, want 20", st.Fetched)
	}
	ratio := float64(bc.sent.Load()) / float64(st.FetchedBytes)
	t.Logf("warm pull: %d bytes sent for %d bytes of objects (%.3f), %d requests of objects/", bc.sent.Load(), st.FetchedBytes, ratio, ts.hitsUnder("/objects/"))
	if ratio > 1.05 {
		t.Errorf("the warm pull moved %.3f times the bytes it needs, want at most 1.05", ratio)
	}
	checkInvariant(t, root)
}

// TestPackReuseRecentIndexes: a build reuses the packs named by the
// maxReuseIndexes most recently written pack indexes, and reads no older
// one (what it reads stays bounded in a repository of many images).
func TestPackReuseRecentIndexes(t *testing.T) {
	v1 := makeFiles("f", 3, 40, 32<<10)
	v2 := append([]testFile(nil), v1...)
	for i := 0; i < len(v2); i += 10 {
		v2[i].data = content(uint64(8000+i), len(v2[i].data))
	}
	setMtime := func(t *testing.T, repo string, d cfs.Digest, tm time.Time) {
		t.Helper()
		if err := os.Chtimes(filepath.Join(repo, "packs", PackIndexName(d)), tm, tm); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		others int
		newest bool // the first image's index is the newest
		reuse  bool
	}{{maxReuseIndexes - 1, false, true}, {maxReuseIndexes, false, false}, {maxReuseIndexes + 2, true, true}} {
		t.Run(fmt.Sprintf("%d others, newest %v", c.others, c.newest), func(t *testing.T) {
			repo := t.TempDir()
			base := time.Now().Add(-time.Hour)
			d1 := publishPacked(t, repo, "app-1.cfs", v1)
			setMtime(t, repo, d1, base)
			if c.newest {
				setMtime(t, repo, d1, base.Add(time.Duration(c.others+1)*time.Second))
			}
			packs1 := packFiles(t, repo, ".tar")
			for i := range c.others {
				d := publishPacked(t, repo, fmt.Sprintf("other-%d.cfs", i), makeFiles(fmt.Sprintf("o%d-", i), uint64(100+i), 1, 1<<10))
				setMtime(t, repo, d, base.Add(time.Duration(i+1)*time.Second))
			}
			x2 := readRepoIndex(t, repo, publishPacked(t, repo, "app-2.cfs", v2))
			reused := 0
			for _, p := range x2.Packs {
				for _, f := range packs1 {
					if filepath.Base(f) == p.Name() {
						reused++
					}
				}
			}
			if (reused > 0) != c.reuse {
				t.Errorf("with %d other indexes (the first newest: %v) the second image reuses %d of the first's %d packs; want reuse %v",
					c.others, c.newest, reused, len(packs1), c.reuse)
			}
		})
	}
}

// TestPackedFallbacks: a repository whose packs cannot be used still
// serves every object from objects/.
func TestPackedFallbacks(t *testing.T) {
	files := makeFiles("s", 3, 120, 8<<10)
	other := append(append([]testFile(nil), files...), makeFiles("o", 4, 30, 8<<10)...)
	for _, tc := range []struct {
		name string
		// prepare breaks the repository (the image is app.cfs, digest d);
		// it may return a fault.
		prepare func(t *testing.T, repo string, d cfs.Digest) faultFunc
		// packsRead: the packs are read (and fail), or never.
		packsRead bool
		// objectReqs: at least this many requests of objects/.
		objectReqs int
	}{
		{name: "no index", objectReqs: len(files), prepare: func(t *testing.T, repo string, d cfs.Digest) faultFunc {
			os.Remove(filepath.Join(repo, "packs", PackIndexName(d)))
			return nil
		}},
		{name: "built without packs", objectReqs: len(files), prepare: func(t *testing.T, repo string, d cfs.Digest) faultFunc {
			os.RemoveAll(filepath.Join(repo, "packs"))
			publishPacked(t, repo, "app.cfs", files, KeepExisting())
			return nil
		}},
		{name: "index of another image", objectReqs: len(files), prepare: func(t *testing.T, repo string, d cfs.Digest) faultFunc {
			// A superset image's index, valid and with valid packs, in
			// the place of the image's own: ignored.
			d2 := publishPacked(t, repo, "other.cfs", other)
			b, err := os.ReadFile(filepath.Join(repo, "packs", PackIndexName(d2)))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(repo, "packs", PackIndexName(d)), b, 0o644); err != nil {
				t.Fatal(err)
			}
			return nil
		}},
		{name: "index garbled", objectReqs: len(files), prepare: func(t *testing.T, repo string, d cfs.Digest) faultFunc {
			os.WriteFile(filepath.Join(repo, "packs", PackIndexName(d)), []byte("CFSPKIX1 not an index"), 0o644)
			return nil
		}},
		{name: "index unavailable", objectReqs: len(files), prepare: func(t *testing.T, repo string, d cfs.Digest) faultFunc {
			return func(w http.ResponseWriter, r *http.Request, n int) bool {
				if strings.HasSuffix(r.URL.Path, ".idx") {
					http.Error(w, "down", http.StatusServiceUnavailable)
					return true
				}
				return false
			}
		}},
		{name: "pack corrupted", packsRead: true, objectReqs: 1, prepare: func(t *testing.T, repo string, d cfs.Digest) faultFunc {
			x := readRepoIndex(t, repo, d)
			e := x.Index.Entries[len(x.Index.Entries)/2]
			p := filepath.Join(repo, "packs", x.Packs[e.Pack].Name())
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			b[e.Offset+int64(e.Size)/2] ^= 0xff
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			return nil
		}},
		{name: "pack truncated", packsRead: true, objectReqs: len(files), prepare: func(t *testing.T, repo string, d cfs.Digest) faultFunc {
			x := readRepoIndex(t, repo, d)
			if err := os.Truncate(filepath.Join(repo, "packs", x.Packs[0].Name()), x.Packs[0].Size/2); err != nil {
				t.Fatal(err)
			}
			return nil
		}},
		{name: "pack gone", packsRead: true, objectReqs: len(files), prepare: func(t *testing.T, repo string, d cfs.Digest) faultFunc {
			x := readRepoIndex(t, repo, d)
			os.Remove(filepath.Join(repo, "packs", x.Packs[0].Name()))
			return nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			repo := t.TempDir()
			d := publishPacked(t, repo, "app.cfs", files)
			if n := len(packFiles(t, repo, ".tar")); n != 1 {
				t.Fatalf("%d packs, want 1", n)
			}
			fault := tc.prepare(t, repo, d)
			ts := newTestServer(t, repo)
			ts.setFault(fault)
			root := t.TempDir()
			s := openStore(t, root, testOptions())
			if got := mustPull(t, s, newSource(t, ts.URL, HTTPOptions{}), "app.cfs"); got != d {
				t.Fatal(got)
			}
			if !hasObjects(t, root, files) {
				t.Fatal("objects missing after the pull")
			}
			checkInvariant(t, root)
			tars := 0
			ts.mu.Lock()
			for k, v := range ts.hits {
				if strings.HasSuffix(k, ".tar") {
					tars += v
				}
			}
			ts.mu.Unlock()
			objReqs := ts.hitsUnder("/objects/")
			t.Logf("%d requests of packs, %d of objects/", tars, objReqs)
			if (tars > 0) != tc.packsRead {
				t.Errorf("%d requests of packs, want them read: %v", tars, tc.packsRead)
			}
			if objReqs < tc.objectReqs || (tc.packsRead && objReqs >= len(files) && tc.objectReqs < len(files)) {
				t.Errorf("%d requests of objects/, want at least %d", objReqs, tc.objectReqs)
			}
		})
	}
}

// TestPackedRangeIgnored: a server that ignores Range on packs is read
// through (to each run's start, then whole packs), and no object comes
// from objects/.
func TestPackedRangeIgnored(t *testing.T) {
	files := makeFiles("s", 5, 300, 16<<10)
	repo := t.TempDir()
	d := publishPacked(t, repo, "app.cfs", files, WithPacks(PackOptions{PackSize: 1 << 20}))
	if n := len(packFiles(t, repo, ".tar")); n < 2 {
		t.Fatalf("%d packs, want several", n)
	}
	ts := newTestServer(t, repo)
	var ranged atomic.Int64
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if r.Header.Get("Range") != "" {
			ranged.Add(1)
			r.Header.Del("Range")
		}
		return false
	})
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	if got := mustPull(t, s, src, "app.cfs"); got != d {
		t.Fatal(got)
	}
	if !hasObjects(t, root, files) {
		t.Fatal("objects missing after the pull")
	}
	checkInvariant(t, root)
	if n := ts.hitsUnder("/objects/"); n != 0 {
		t.Errorf("%d requests of objects/, want none", n)
	}
	if ranged.Load() == 0 && !src.packNoRange.Load() {
		t.Errorf("no ranged request was made, or the source did not notice Range was ignored")
	}
}

// TestPackedPullConcurrentPaths: the runs and the per-object downloads of
// one pull go on at the same time: a large object's request is answered
// only once a pack's has begun.
func TestPackedPullConcurrentPaths(t *testing.T) {
	files := makeFiles("s", 6, 50, 8<<10)
	files = append(files, testFile{name: "big", data: content(77, 2<<20)})
	repo := t.TempDir()
	publishPacked(t, repo, "app.cfs", files)
	ts := newTestServer(t, repo)
	var packOnce, objOnce sync.Once
	var apart atomic.Bool
	packStarted := make(chan struct{})
	objStarted := make(chan struct{})
	wait := func(c chan struct{}) {
		select {
		case <-c:
		case <-time.After(5 * time.Second):
			apart.Store(true)
		}
	}
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		switch {
		case strings.HasSuffix(r.URL.Path, ".tar"):
			packOnce.Do(func() { close(packStarted) })
			wait(objStarted)
		case strings.HasPrefix(r.URL.Path, "/objects/"):
			objOnce.Do(func() { close(objStarted) })
			wait(packStarted)
		}
		return false
	})
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	mustPull(t, s, newSource(t, ts.URL, HTTPOptions{}), "app.cfs")
	if !hasObjects(t, root, files) {
		t.Fatal("objects missing")
	}
	if apart.Load() {
		t.Error("the pack's and the large object's requests did not overlap")
	}
}

// TestPackedPullCredentials: packs are requested with the repository's
// credentials, as objects are.
func TestPackedPullCredentials(t *testing.T) {
	files := makeFiles("s", 8, 100, 8<<10)
	repo := t.TempDir()
	publishPacked(t, repo, "app.cfs", files)
	ts := newTestServer(t, repo)
	ts.auth = "user:secret"
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	mustPull(t, s, newSource(t, ts.URL, HTTPOptions{Username: "user", Password: "secret"}), "app.cfs")
	if !hasObjects(t, root, files) {
		t.Fatal("objects missing")
	}
	if n := ts.hitsUnder("/objects/"); n != 0 {
		t.Errorf("%d requests of objects/, want none (the packs answered)", n)
	}
}

// TestPackedPullCutShort: a pack read cut short is retried from the
// first object not yet received, from the pack (no object from objects/).
func TestPackedPullCutShort(t *testing.T) {
	files := makeFiles("s", 9, 200, 16<<10)
	repo := t.TempDir()
	publishPacked(t, repo, "app.cfs", files)
	ts := newTestServer(t, repo)
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if !strings.HasSuffix(r.URL.Path, ".tar") || n > 1 {
			return false
		}
		b, err := os.ReadFile(filepath.Join(ts.dir, filepath.FromSlash(r.URL.Path)))
		if err != nil {
			panic(err)
		}
		first, last := int64(0), int64(len(b)-1)
		if rg := r.Header.Get("Range"); rg != "" {
			if _, err := fmt.Sscanf(rg, "bytes=%d-%d", &first, &last); err != nil {
				panic(err)
			}
		}
		conn, buf, err := w.(http.Hijacker).Hijack()
		if err != nil {
			panic(err)
		}
		fmt.Fprintf(buf, "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n\r\n", first, last, len(b), last-first+1)
		buf.Write(b[first : first+(last-first+1)/2])
		buf.Flush()
		conn.Close()
		return true
	})
	root := t.TempDir()
	s := openStore(t, root, testOptions())
	mustPull(t, s, newSource(t, ts.URL, HTTPOptions{}), "app.cfs")
	if !hasObjects(t, root, files) {
		t.Fatal("objects missing")
	}
	checkInvariant(t, root)
	if n := ts.hitsUnder("/objects/"); n != 0 {
		t.Errorf("%d requests of objects/, want none (the pack is read again)", n)
	}
	if n := ts.hitsUnder("/packs/") - 1; n < 2 {
		t.Errorf("%d requests of the pack, want the cut one and a retry", n)
	}
}

// TestPackedLookups: a lone cold pull of a packed repository looks each
// object up once (the scan), not again as its run reaches it; an object
// that another call stores while a run waits is still looked up, read
// past and counted present, not written again.
func TestPackedLookups(t *testing.T) {
	files := makeFiles("s", 13, 120, 8<<10)
	repo := t.TempDir()
	da := publishPacked(t, repo, "a.cfs", files)
	shared := files[len(files)/2]
	db := writeRepoImage(t, repo, "b.cfs", []testFile{shared}) // no pack index: from objects/
	ts := newTestServer(t, repo)
	ctx := context.Background()
	src := newSource(t, ts.URL, HTTPOptions{})

	// An object named between the store's count and the call's own
	// count may make a reader look one up again: a few, not one each.
	if n := lonePullLookups(t, src, "a.cfs", da); n > uint64(len(files)+len(files)/10) {
		t.Errorf("%d lookups for a cold pull of %d packed objects, want one each (the scan)", n, len(files))
	}

	s := openStore(t, t.TempDir(), testOptions())
	for _, name := range []string{"a.cfs", "b.cfs"} {
		if _, err := s.EnsureImage(ctx, src, ImageRef{Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	st := pullWhileHeld(t, ts, s, src, da, db, func(path string) bool { return strings.HasSuffix(path, ".tar") })
	if st.Present != 1 || st.Fetched != len(files)-1 {
		t.Errorf("stats %+v, want the object the other call stored present and the others fetched", st)
	}
	checkInvariant(t, s.Root())
}

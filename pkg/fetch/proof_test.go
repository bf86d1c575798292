package fetch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// needXattrs skips a test that needs user xattrs where the store's
// filesystem has none (provenance then lives in memory only).
func needXattrs(t *testing.T, dir string) {
	t.Helper()
	p := filepath.Join(dir, "xattr-probe")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(p)
	if err := unix.Setxattr(p, shownXattr, []byte("12345678"), 0); err != nil {
		t.Skipf("the test directory's filesystem refuses user xattrs (%v): provenance across restarts cannot be tested here", err)
	}
}

// proofFiles are objects of every proof kind: small (asked for whole),
// large (one block asked), and a large one that is zeros but for one
// block (the challenge must land on that block).
func proofFiles() []testFile {
	files := makeFiles("s", 71, 4, 8000)
	files = append(files, makeFiles("l", 72, 3, 200000)...)
	sparse := make([]byte, 40*proofBlock)
	copy(sparse[17*proofBlock:], content(73, proofBlock))
	files = append(files, testFile{name: "sparse", data: sparse})
	for i := range files {
		if strings.HasPrefix(files[i].name, "l") && len(files[i].data) <= proofWholeMax {
			files[i].data = content(uint64(80+i), proofWholeMax+1+i)
		}
	}
	return files
}

// rangeLog records the Range headers a server received, by path.
type rangeLog struct {
	mu     sync.Mutex
	ranges map[string][]string
}

func (l *rangeLog) add(r *http.Request) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ranges == nil {
		l.ranges = map[string][]string{}
	}
	l.ranges[r.URL.Path] = append(l.ranges[r.URL.Path], r.Header.Get("Range"))
}

func (l *rangeLog) get(path string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.ranges[path]...)
}

func objectURLPath(d cfs.Digest) string { return "/objects/" + d.ObjectPath() }

// TestProofsOfPossession: content pulled for principal A serves principal
// B only once B's source proved it holds it: small objects whole, large
// ones one 4 KiB block, and a server ignoring Range with the whole object.
// Servers that do not hold the content fail, naming the object.
func TestProofsOfPossession(t *testing.T) {
	repo := t.TempDir()
	files := proofFiles()
	d := writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	s := openStore(t, t.TempDir(), testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "a.cfs"}, ForPrincipal("A")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.EnsureObjects(ctx, src, d, ForPrincipal("A")); err != nil {
		t.Fatal(err)
	}
	// serverFor serves the repository answering as mode says.
	serverFor := func(mode string) (*testServer, *HTTPSource, *rangeLog) {
		log := new(rangeLog)
		srv := newTestServer(t, repo)
		srv.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
			log.add(r)
			switch mode {
			case "ignore-range":
				r.Header.Del("Range")
			case "empty-200":
				w.WriteHeader(http.StatusOK)
				return true
			case "404":
				http.NotFound(w, r)
				return true
			case "zeros":
				// Knows the sizes, not the bytes: answers every range with zeros.
				if rg := r.Header.Get("Range"); rg != "" {
					var a, b int64
					fmt.Sscanf(rg, "bytes=%d-%d", &a, &b)
					var total int64
					for _, f := range files {
						if objectURLPath(cfs.VerityDigestOf(f.data)) == r.URL.Path {
							total = int64(len(f.data))
						}
					}
					w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", a, b, total))
					w.WriteHeader(http.StatusPartialContent)
					w.Write(make([]byte, b-a+1))
					return true
				}
			}
			return false
		})
		return srv, newSource(t, srv.URL, HTTPOptions{}), log
	}

	sparse := cfs.VerityDigestOf(files[len(files)-1].data)
	for _, m := range []string{"empty-200", "404", "zeros"} {
		_, bsrc, log := serverFor(m)
		_, err := s.EnsureObjects(ctx, bsrc, d, ForPrincipal("B-"+m))
		if !errors.Is(err, ErrNotProven) || !strings.Contains(err.Error(), "object ") {
			t.Errorf("%s: %v, want ErrNotProven naming an object", m, err)
		}
		if m != "zeros" {
			continue
		}
		// The sparse object's challenge is its one non-zero block, and the
		// same on every attempt (retrying cannot draw another block).
		if _, err := s.EnsureObjects(ctx, bsrc, d, ForPrincipal("B-"+m)); !errors.Is(err, ErrNotProven) {
			t.Errorf("%s again: %v", m, err)
		}
		want := fmt.Sprintf("bytes=%d-%d", 17*proofBlock, 18*proofBlock-1)
		for _, rg := range log.get(objectURLPath(sparse)) {
			if rg != want {
				t.Errorf("sparse object challenged with %q, want %q every time", rg, want)
			}
		}
	}

	for _, m := range []string{"", "ignore-range"} {
		other, bsrc, log := serverFor(m)
		who := "B" + m
		st, err := s.EnsureObjects(ctx, bsrc, d, ForPrincipal(who))
		if err != nil {
			t.Fatalf("%q: %v", m, err)
		}
		if st.Proven != len(files) || st.Present != 0 || st.Fetched != 0 {
			t.Errorf("%q: %+v, want every object proven", m, st)
		}
		var wantBytes uint64
		for _, f := range files {
			p := objectURLPath(cfs.VerityDigestOf(f.data))
			if got := other.objectHits()[p]; got != 1 {
				t.Errorf("%q: %s asked %d times, want once", m, f.name, got)
			}
			rg := log.get(p)
			small := len(f.data) <= proofWholeMax
			if small != (rg[0] == "") {
				t.Errorf("%q: %s (%d bytes) asked with Range %q", m, f.name, len(f.data), rg[0])
			}
			var a, b uint64
			if small || m == "ignore-range" {
				wantBytes += uint64(len(f.data))
			} else if _, err := fmt.Sscanf(rg[0], "bytes=%d-%d", &a, &b); err != nil || a%proofBlock != 0 || b-a+1 > proofBlock {
				t.Errorf("%q: %s asked with Range %q, want one aligned block", m, f.name, rg[0])
			} else {
				wantBytes += b - a + 1
			}
		}
		if st.ProofBytes != wantBytes {
			t.Errorf("%q: proofs received %d bytes, want %d", m, st.ProofBytes, wantBytes)
		}
		// Shown once: no request the next time.
		before := other.objectHits()
		if st, err := s.EnsureObjects(ctx, bsrc, d, ForPrincipal(who)); err != nil || st.Proven != 0 || st.Present != len(files) {
			t.Errorf("%q again: %+v, %v", m, st, err)
		}
		for p, n := range other.objectHits() {
			if n != before[p] {
				t.Errorf("%q again: %s asked again", m, p)
			}
		}
	}
	// The principal that delivered the content never proves anything.
	before := ts.objectHits()
	if st, err := s.EnsureObjects(ctx, src, d, ForPrincipal("A")); err != nil || st.Proven != 0 {
		t.Errorf("A again: %+v, %v", st, err)
	}
	for p, n := range ts.objectHits() {
		if n != before[p] {
			t.Errorf("A again: %s asked again", p)
		}
	}
	if c := s.Counters(); c.Proofs < uint64(2*len(files)) || c.ProofsFailed < 3 {
		t.Errorf("counters %+v, want at least %d proofs and 3 failures", c, 2*len(files))
	}
}

// TestImageProof: an image in the store serves another principal only
// when its source serves bytes with the image's digest under the name.
func TestImageProof(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 91, 3, 3000)
	d := writeRepoImage(t, repo, "a.cfs", files)
	img, err := os.ReadFile(filepath.Join(repo, "images", "a.cfs"))
	if err != nil {
		t.Fatal(err)
	}
	ts := newTestServer(t, repo)
	s := openStore(t, t.TempDir(), testOptions())
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, newSource(t, ts.URL, HTTPOptions{}), ImageRef{Name: "a.cfs", Digest: d}, ForPrincipal("A")); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name  string
		serve func(w http.ResponseWriter)
		ok    bool
	}{
		{"empty 200", func(w http.ResponseWriter) { w.WriteHeader(http.StatusOK) }, false},
		{"other bytes", func(w http.ResponseWriter) { w.Write(bytes.Repeat([]byte{1}, len(img))) }, false},
		{"truncated, no length", func(w http.ResponseWriter) { w.(http.Flusher).Flush(); w.Write(img[:len(img)-1]) }, false},
		{"longer", func(w http.ResponseWriter) { w.(http.Flusher).Flush(); w.Write(append(img, 0)) }, false},
		{"401", func(w http.ResponseWriter) { http.Error(w, "no", http.StatusUnauthorized) }, false},
		{"the image", func(w http.ResponseWriter) { w.Write(img) }, true},
	} {
		srv := newTestServer(t, t.TempDir())
		srv.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool { tt.serve(w); return true })
		src := newSource(t, srv.URL, HTTPOptions{})
		who := ForPrincipal("B " + tt.name)
		got, err := s.EnsureImage(ctx, src, ImageRef{Name: "x.cfs", Digest: d}, who)
		if tt.ok != (err == nil) || (!tt.ok && !errors.Is(err, ErrNotProven)) {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if tt.ok && got != d {
			t.Errorf("%s: digest %s", tt.name, got)
		}
		// Shown: asked no more.
		if tt.ok {
			n := srv.count("/images/x.cfs")
			if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "x.cfs", Digest: d}, who); err != nil || srv.count("/images/x.cfs") != n {
				t.Errorf("%s again: %v, %d requests", tt.name, err, srv.count("/images/x.cfs")-n)
			}
		}
	}
	checkInvariant(t, s.Root())
}

// TestProvenanceSurvivesRestartAndIsBounded: what a principal showed is
// remembered by the store across a reopen; each file remembers at most
// maxShown principals, the oldest leaving first.
func TestProvenanceSurvivesRestartAndIsBounded(t *testing.T) {
	root := t.TempDir()
	needXattrs(t, root)
	repo := t.TempDir()
	files := makeFiles("f", 93, 4, 30000)
	d := writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	s := openStore(t, root, testOptions())
	pull := func(s *Store, who string) Stats {
		t.Helper()
		if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "a.cfs", Digest: d}, ForPrincipal(who)); err != nil {
			t.Fatal(err)
		}
		st, err := s.EnsureObjects(ctx, src, d, ForPrincipal(who))
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	if st := pull(s, "p0"); st.Fetched != len(files) {
		t.Fatalf("first pull: %+v", st)
	}
	for i := 1; i < maxShown+2; i++ {
		if st := pull(s, fmt.Sprint("p", i)); st.Proven != len(files) {
			t.Fatalf("p%d: %+v, want every object proven", i, st)
		}
	}
	s.Close()
	s = openStore(t, root, testOptions())
	requests := func() int {
		n := ts.count("/images/a.cfs")
		for _, c := range ts.objectHits() {
			n += c
		}
		return n
	}
	// The last maxShown principals are remembered: no request at all.
	before := requests()
	for i := 2; i < maxShown+2; i++ {
		if st := pull(s, fmt.Sprint("p", i)); st.Proven != 0 || st.Present != len(files) {
			t.Errorf("after the restart, p%d: %+v, want everything present", i, st)
		}
	}
	if n := requests() - before; n != 0 {
		t.Errorf("after the restart, %d requests for principals already shown", n)
	}
	// The two oldest were pushed out: they prove again.
	for _, who := range []string{"p0", "p1"} {
		if st := pull(s, who); st.Proven != len(files) {
			t.Errorf("%s: %+v, want every object proven again (pushed out)", who, st)
		}
	}
	for _, f := range files {
		p := filepath.Join(root, objectsDir, cfs.VerityDigestOf(f.data).ObjectPath())
		ids, err := readShown(p)
		if err != nil || len(ids) != maxShown {
			t.Errorf("%s lists %d principals (%v), want %d", f.name, len(ids), err, maxShown)
		}
	}
}

// TestProvenanceInMemoryFallback: where user xattrs are refused,
// provenance lives in a bounded in-memory set.
func TestProvenanceInMemoryFallback(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions())
	s.prov.noXattr.Store(true)
	ctx := context.Background()
	k := shownKey{d: cfs.Digest{1}, p: s.principalID(ctx, "A")}
	if s.isShown(k) {
		t.Fatal("shown before anything was recorded")
	}
	s.markShown(ctx, k)
	if !s.isShown(k) {
		t.Fatal("not shown after it was recorded")
	}
	for i := 0; i < maxShownInMemory; i++ {
		s.markShown(ctx, shownKey{d: cfs.Digest{2, byte(i), byte(i >> 8)}, p: k.p})
	}
	if n := len(s.prov.mem); n > maxShownInMemory {
		t.Fatalf("%d entries in memory, bound %d", n, maxShownInMemory)
	}
	if s.isShown(k) {
		t.Error("the set was full but the oldest entry is still there: it is not bounded")
	}
}

func TestParseShown(t *testing.T) {
	id := func(b byte) principalID { return principalID{b, b, b, b, b, b, b, b} }
	for _, tt := range []struct {
		in   []byte
		want int
	}{
		{nil, 0},
		{encodeShown([]principalID{id(1)}), 1},
		{encodeShown([]principalID{id(1), id(2), id(3), id(4), id(5), id(6)}), 6},
		{encodeShown([]principalID{id(1), id(2), id(3), id(4), id(5), id(6), id(7)}), 0}, // too long: not ours
		{[]byte("1234567"), 0}, // torn: none
	} {
		if got := parseShown(tt.in); len(got) != tt.want {
			t.Errorf("parseShown(%x) = %d ids, want %d", tt.in, len(got), tt.want)
		}
	}
}

func TestParseContentRange(t *testing.T) {
	for _, tt := range []struct {
		in                 string
		first, last, total int64
		ok                 bool
	}{
		{"bytes 0-4095/10000", 0, 4095, 10000, true},
		{"bytes 4096-8191/*", 4096, 8191, -1, true},
		{"BYTES 1-1/2", 1, 1, 2, true},
		{"bytes 5-4/10", 0, 0, 0, false},
		{"bytes 0-10/10", 0, 0, 0, false},
		{"bytes +1-2/3", 0, 0, 0, false},
		{"bytes -1-2/3", 0, 0, 0, false},
		{"bytes 1 -2/3", 0, 0, 0, false},
		{"bytes */10", 0, 0, 0, false},
		{"items 0-1/2", 0, 0, 0, false},
		{"bytes 0-1", 0, 0, 0, false},
		{"bytes 0-99999999999999999999/1", 0, 0, 0, false},
		{"", 0, 0, 0, false},
	} {
		f, l, tot, err := parseContentRange(tt.in)
		if (err == nil) != tt.ok || (tt.ok && (f != tt.first || l != tt.last || tot != tt.total)) {
			t.Errorf("parseContentRange(%q) = %d, %d, %d, %v", tt.in, f, l, tot, err)
		}
	}
}

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-4095/10000", "bytes 1-2/*", "bytes 0-0/1", "bytes 9-8/7", "bytes=0-1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		first, last, total, err := parseContentRange(s)
		if err != nil {
			return
		}
		if first < 0 || first > last || (total >= 0 && last >= total) || total < -1 {
			t.Fatalf("%q parsed to %d-%d/%d", s, first, last, total)
		}
		tot := "*"
		if total >= 0 {
			tot = fmt.Sprint(total)
		}
		again := fmt.Sprintf("bytes %d-%d/%s", first, last, tot)
		f2, l2, t2, err := parseContentRange(again)
		if err != nil || f2 != first || l2 != last || t2 != total {
			t.Fatalf("%q: round trip through %q failed", s, again)
		}
	})
}

// TestExtraDirsNeedNoProof: objects of --extra-object-dir directories are
// the host's, public to every principal, even when the store has a copy.
func TestExtraDirsNeedNoProof(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 95, 4, 30000)
	d := writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	opts := testOptions()
	opts.ExtraObjectDirs = []string{filepath.Join(repo, "objects")}
	s := openStore(t, t.TempDir(), opts)
	// A copy of one object in the store too, delivered by A.
	one := cfs.VerityDigestOf(files[0].data)
	if err := os.MkdirAll(filepath.Dir(s.objectPath(one)), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.objectPath(one), files[0].data, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "a.cfs"}, ForPrincipal("B")); err != nil {
		t.Fatal(err)
	}
	st, err := s.EnsureObjects(ctx, src, d, ForPrincipal("B"))
	if err != nil || st.Extra != len(files) || st.Proven != 0 {
		t.Fatalf("%+v, %v; want every object from the extra directory, none proven", st, err)
	}
	if hits := ts.objectHits(); len(hits) != 0 {
		t.Errorf("object requests %v", hits)
	}
}

// TestSharedDownloadIsProvedByJoiner: a call for another principal that
// joins a download in flight (made from the first principal's source) must
// still have its own source prove the content.
func TestSharedDownloadIsProvedByJoiner(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 97, 4, 30000)
	d := writeRepoImage(t, repo, "a.cfs", files)
	ts := newTestServer(t, repo)
	release := make(chan struct{})
	arrived := make(chan struct{}, len(files))
	ts.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if strings.HasPrefix(r.URL.Path, "/objects/") {
			arrived <- struct{}{}
			<-release
		}
		return false
	})
	attacker := newTestServer(t, t.TempDir()) // has nothing: 404
	s := openStore(t, t.TempDir(), testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "a.cfs"}, ForPrincipal("A")); err != nil {
		t.Fatal(err)
	}
	errA := make(chan error, 1)
	go func() {
		_, err := s.EnsureObjects(ctx, src, d, ForPrincipal("A"))
		errA <- err
	}()
	for range files {
		<-arrived // every object's download is in flight
	}
	errB := make(chan error, 1)
	go func() {
		_, err := s.EnsureObjects(ctx, newSource(t, attacker.URL, HTTPOptions{}), d, ForPrincipal("B"))
		errB <- err
	}()
	// Let B join the downloads before they finish.
	deadline := time.Now().Add(5 * time.Second)
	for s.objects.waiting() < len(files) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	close(release)
	if err := <-errA; err != nil {
		t.Fatal(err)
	}
	if err := <-errB; !errors.Is(err, ErrNotProven) {
		t.Fatalf("the joiner: %v, want ErrNotProven (its source has nothing)", err)
	}
}

// waiting counts the callers that joined a call in flight.
func (g *flightGroup[T]) waiting() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, f := range g.m {
		n += f.waiters - 1
	}
	return n
}

// TestNoProofForOwnConcurrentDownload: a call of principal A that finds an
// object stored the moment another call of A downloaded it (its name just
// given, that call not yet returned) counts it present: the principal
// delivered it, so no proof request is made (30 pods of one source
// starting at once made one before).
func TestNoProofForOwnConcurrentDownload(t *testing.T) {
	repo := t.TempDir()
	files := []testFile{{name: "only", data: content(91, 50000)}}
	d := writeRepoImage(t, repo, "one.cfs", files)
	obj := objectURLPath(cfs.VerityDigestOf(files[0].data))
	ts := newTestServer(t, repo)
	s := openStore(t, t.TempDir(), testOptions())
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "one.cfs"}, ForPrincipal("A")); err != nil {
		t.Fatal(err)
	}
	var (
		second    Stats
		secondErr error
		ran       bool
	)
	s.afterPublish = func(cfs.Digest) {
		if ran {
			return
		}
		ran = true
		second, secondErr = s.EnsureObjects(ctx, src, d, ForPrincipal("A"))
	}
	if _, err := s.EnsureObjects(ctx, src, d, ForPrincipal("A")); err != nil {
		t.Fatal(err)
	}
	if !ran || secondErr != nil {
		t.Fatalf("second call ran %v, err %v", ran, secondErr)
	}
	if second.Proven != 0 || second.Present != 1 || ts.count(obj) != 1 {
		t.Fatalf("second call: %d proven, %d present; server: %d requests for the object; want 0, 1, 1", second.Proven, second.Present, ts.count(obj))
	}
}

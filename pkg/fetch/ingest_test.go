package fetch

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// pieceReader hands out its bytes a few at a time, then fails with err
// (io.EOF at the end when nil).
type pieceReader struct {
	data  []byte
	piece int
	err   error
}

func (r *pieceReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.piece)], r.data)
	r.data = r.data[n:]
	return n, nil
}

type writeCounter struct {
	writes int
	got    []byte
}

func (w *writeCounter) Write(p []byte) (int, error) {
	w.writes++
	w.got = append(w.got, p...)
	return len(p), nil
}

// copyBody fills its buffer before writing: a body that fits in it is
// written (and hashed) with one write however many reads it takes, a
// larger one in buffer-sized writes, and what was read before a read
// error is written before the error is returned (a resumed download keeps
// it).
func TestCopyBodyWritesWholeBuffers(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions())
	cut := errors.New("connection reset")
	for _, tc := range []struct {
		name      string
		size      int
		err       error
		wantWrite int
	}{
		{"small object", 10 << 10, nil, 1},
		{"one copy buffer", 60 << 10, nil, 1},
		{"several buffers", 200 << 10, nil, 4},
		{"cut", 5000, cut, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := content(7, tc.size)
			w := &writeCounter{}
			limit := int64(tc.size) + 1
			if tc.err != nil {
				limit += 1000 // the body was to be longer
			}
			n, err := s.copyBody(w, &pieceReader{data: data, piece: 1000, err: tc.err}, limit)
			if tc.err != nil {
				if !errors.Is(err, cut) || !IsTransient(err) {
					t.Fatalf("error %v, want the transient read error", err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if n != int64(tc.size) || string(w.got) != string(data) {
				t.Fatalf("copied %d bytes (%d written), want %d", n, len(w.got), tc.size)
			}
			if w.writes != tc.wantWrite {
				t.Errorf("%d writes, want %d", w.writes, tc.wantWrite)
			}
		})
	}
}

// A reader that returns nothing, forever, fails rather than spinning.
func TestCopyBodyNoProgress(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions())
	_, err := s.copyBody(io.Discard, readerFunc(func([]byte) (int, error) { return 0, nil }), 100)
	if !errors.Is(err, io.ErrNoProgress) {
		t.Fatalf("got %v, want io.ErrNoProgress", err)
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// Objects are stored with mode 0644 whatever the process's umask: the
// store skips the fchmod of anonymous temporary files only where a probe
// at Open found that they keep the mode they are created with.
func TestObjectModeWhateverUmask(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("m", 41, 6, 8<<10)
	d := writeRepoImage(t, repo, "m.cfs", files)
	ts := newTestServer(t, repo)
	for _, tc := range []struct {
		umask    int
		wantSkip bool
	}{{0o022, true}, {0o002, true}, {0o077, false}, {0o027, false}} {
		old := syscall.Umask(tc.umask)
		root := t.TempDir()
		s := openStore(t, root, testOptions())
		syscall.Umask(old)
		if !s.opts.NamedTempFiles && !noTmpfile.Load() && s.anonModeSet != tc.wantSkip {
			t.Errorf("umask %04o: fchmod skipped %v, want %v", tc.umask, s.anonModeSet, tc.wantSkip)
		}
		old = syscall.Umask(tc.umask)
		_, err := s.EnsureImage(context.Background(), newSource(t, ts.URL, HTTPOptions{}), ImageRef{Name: "m.cfs"})
		if err == nil {
			_, err = s.EnsureObjects(context.Background(), newSource(t, ts.URL, HTTPOptions{}), d)
		}
		syscall.Umask(old)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			fi, err := os.Stat(filepath.Join(root, "objects", cfs.VerityDigestOf(f.data).ObjectPath()))
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o644 {
				t.Fatalf("umask %04o: object %s has mode %v, want 0644", tc.umask, f.name, fi.Mode())
			}
		}
	}
}

// A cold pull measures the free space once per freeSpaceMaxAge, not once
// per object, and still refuses an object that does not fit (on a fresh
// measurement).
func TestFreeSpaceMeasuredOncePerPull(t *testing.T) {
	repo := t.TempDir()
	files := makeFiles("f", 43, 60, 4<<10)
	d := writeRepoImage(t, repo, "f.cfs", files)
	ts := newTestServer(t, repo)
	opts := testOptions()
	opts.MinFreeSpace = 1 << 20
	s := openStore(t, t.TempDir(), opts)
	var (
		measured atomic.Int64
		free     atomic.Int64
	)
	free.Store(1 << 40)
	s.measureFree = func() (int64, error) { measured.Add(1); return free.Load(), nil }
	src := newSource(t, ts.URL, HTTPOptions{})
	ctx := context.Background()
	if _, err := s.EnsureImage(ctx, src, ImageRef{Name: "f.cfs"}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := s.EnsureObjects(ctx, src, d); err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	if n, most := measured.Load(), int64(elapsed/freeSpaceMaxAge)+2; n > most {
		t.Errorf("free space measured %d times for %d objects in %v, want at most %d", n, len(files), elapsed, most)
	}

	// A cached measurement that says an object does not fit is measured
	// again before the object is refused…
	o := cfs.Object{Digest: cfs.VerityDigestOf(files[0].data), Size: uint64(len(files[0].data))}
	s.freeCache.mu.Lock()
	s.freeCache.at, s.freeCache.free, s.freeCache.admitted = time.Now(), 0, 0
	s.freeCache.mu.Unlock()
	r, err := s.admitObjectDownload(ctx, o)
	if err != nil {
		t.Fatalf("refused on a stale measurement: %v", err)
	}
	r.release()
	// …and one that does not fit on a fresh one is refused.
	free.Store(1 << 20)
	s.freeCache.mu.Lock()
	s.freeCache.at = time.Time{}
	s.freeCache.mu.Unlock()
	if _, err := s.admitObjectDownload(ctx, o); !errors.Is(err, ErrResourceLimit) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("got %v, want refused for lack of free space", err)
	}
}

// An object a call found missing is looked up again before its download
// only when another call has stored objects since: a lone cold pull looks
// each object up once (the scan), and an object a concurrent call stored
// meanwhile is still not downloaded twice.
func TestLookupsBeforeDownload(t *testing.T) {
	repo := t.TempDir()
	// Sizes 6, 5, …, 1 KiB: interleave fetches 6, 1, 5, 2, 4, 3; with one
	// download slot (four workers) the 3 KiB object starts last.
	var files []testFile
	for i := 6; i >= 1; i-- {
		files = append(files, testFile{name: "a" + string(rune('0'+i)), data: content(uint64(50+i), i<<10)})
	}
	shared := files[3] // 3 KiB
	da := writeRepoImage(t, repo, "a.cfs", files)
	db := writeRepoImage(t, repo, "b.cfs", []testFile{shared})
	sharedPath := "/objects/" + cfs.VerityDigestOf(shared.data).ObjectPath()
	ts := newTestServer(t, repo)
	ctx := context.Background()
	src := newSource(t, ts.URL, HTTPOptions{})

	// A lone pull: one lookup per object.
	if n := lonePullLookups(t, src, "a.cfs", da); n != uint64(len(files)) {
		t.Errorf("%d lookups for a cold pull of %d objects, want one each", n, len(files))
	}

	// Another call stores the shared object while the first waits.
	opts := testOptions()
	opts.Parallelism = 1
	s := openStore(t, t.TempDir(), opts)
	for _, name := range []string{"a.cfs", "b.cfs"} {
		if _, err := s.EnsureImage(ctx, src, ImageRef{Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	sharedBefore := ts.count(sharedPath)
	st := pullWhileHeld(t, ts, s, src, da, db, func(path string) bool {
		return strings.HasPrefix(path, "/objects/") && path != sharedPath
	})
	if n := ts.count(sharedPath) - sharedBefore; n != 1 {
		t.Errorf("the object the other call stored was requested %d times, want once", n)
	}
	if st.Present != 1 || st.Fetched != len(files)-1 {
		t.Errorf("stats %+v, want the shared object present and the others fetched", st)
	}
	checkInvariant(t, s.Root())
}

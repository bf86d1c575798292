package fetch

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// Corrupt is one file Verify found wrong and moved to quarantine/.
type Corrupt struct {
	Path    string // where it was, relative to the store root
	Reason  string
	MovedTo string // relative to the store root
}

// Unreadable is one file Verify could not open or read (EMFILE, EIO…): an
// error to report, not evidence of corruption, so the file stays.
type Unreadable struct {
	Path string // relative to the store root
	Err  error
}

// VerifyReport tells what Verify checked and found.
type VerifyReport struct {
	Objects, Images int   // files checked
	Bytes           int64 // bytes hashed
	Corrupt         []Corrupt
	Unreadable      []Unreadable
}

// Verify re-hashes every object and image and moves each file whose digest
// is not the one its name says (or whose name is not a digest, or that is
// not a regular file) to quarantine/, never deleting it, and reports it. A
// file it cannot open or read is left in place and reported in Unreadable,
// and Verify then returns an error after checking everything else. It runs
// while the store is in use: files are only ever renamed in complete.
func (s *Store) Verify(ctx context.Context) (VerifyReport, error) {
	var rep VerifyReport
	type job struct {
		rel  string
		want cfs.Digest
		bad  string // a reason found without hashing
	}
	var jobs []job
	objRoot := filepath.Join(s.root, objectsDir)
	subs, err := os.ReadDir(objRoot)
	if err != nil {
		return rep, fmt.Errorf("verifying %s: %w", objRoot, err)
	}
	for _, sub := range subs {
		rel := filepath.Join(objectsDir, sub.Name())
		if !sub.IsDir() || len(sub.Name()) != 2 {
			jobs = append(jobs, job{rel: rel, bad: "not an object directory"})
			continue
		}
		ents, err := os.ReadDir(filepath.Join(s.root, rel))
		if err != nil {
			return rep, fmt.Errorf("verifying %s: %w", rel, err)
		}
		for _, e := range ents {
			r := filepath.Join(rel, e.Name())
			d, err := cfs.ParseObjectPath(sub.Name() + "/" + e.Name())
			switch {
			case err != nil:
				jobs = append(jobs, job{rel: r, bad: "not named by a digest"})
			case !e.Type().IsRegular():
				jobs = append(jobs, job{rel: r, bad: "not a regular file"})
			default:
				jobs = append(jobs, job{rel: r, want: d})
				rep.Objects++
			}
		}
	}
	imgs, err := os.ReadDir(filepath.Join(s.root, imagesDir))
	if err != nil {
		return rep, fmt.Errorf("verifying images: %w", err)
	}
	for _, e := range imgs {
		r := filepath.Join(imagesDir, e.Name())
		d, err := cfs.ParseDigest(strings.TrimSuffix(e.Name(), imageSuffix))
		switch {
		case err != nil || !strings.HasSuffix(e.Name(), imageSuffix):
			jobs = append(jobs, job{rel: r, bad: "not named by a digest"})
		case !e.Type().IsRegular():
			jobs = append(jobs, job{rel: r, bad: "not a regular file"})
		default:
			jobs = append(jobs, job{rel: r, want: d})
			rep.Images++
		}
	}

	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		next     int
		firstErr error
	)
	report := func(j job, reason string) {
		to, err := s.quarantine(ctx, filepath.Join(s.root, j.rel), reason)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			return
		}
		rel, _ := filepath.Rel(s.root, to)
		rep.Corrupt = append(rep.Corrupt, Corrupt{Path: j.rel, Reason: reason, MovedTo: rel})
	}
	for range min(runtime.GOMAXPROCS(0), 8) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				if next >= len(jobs) || firstErr != nil {
					mu.Unlock()
					return
				}
				j := jobs[next]
				next++
				mu.Unlock()
				if err := ctx.Err(); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				if j.bad != "" {
					report(j, j.bad)
					continue
				}
				got, n, err := s.hashFile(ctx, filepath.Join(s.root, j.rel))
				if os.IsNotExist(err) {
					continue // removed by GC meanwhile
				}
				mu.Lock()
				rep.Bytes += n
				mu.Unlock()
				if err != nil && ctx.Err() != nil {
					continue // the loop ends at the next job
				}
				if err != nil {
					mu.Lock()
					rep.Unreadable = append(rep.Unreadable, Unreadable{Path: j.rel, Err: err})
					mu.Unlock()
					continue
				}
				if got != j.want {
					report(j, "content has digest "+got.String())
				}
			}
		}()
	}
	wg.Wait()
	sort.Slice(rep.Corrupt, func(i, j int) bool { return rep.Corrupt[i].Path < rep.Corrupt[j].Path })
	sort.Slice(rep.Unreadable, func(i, j int) bool { return rep.Unreadable[i].Path < rep.Unreadable[j].Path })
	if firstErr != nil {
		return rep, fmt.Errorf("verifying store %s: %w", s.root, firstErr)
	}
	if n := len(rep.Unreadable); n > 0 {
		u := rep.Unreadable[0]
		return rep, fmt.Errorf("verifying store %s: %d files could not be read and were left in place (%s: %w)", s.root, n, u.Path, u.Err)
	}
	return rep, nil
}

func (s *Store) hashFile(ctx context.Context, path string) (cfs.Digest, int64, error) {
	f, err := s.openFile(path)
	if err != nil {
		return cfs.Digest{}, 0, err
	}
	defer f.Close()
	return cfs.VerityDigestReader(cfs.ContextReader(ctx, f))
}

// storeFile is a stored file opened for reading.
type storeFile interface {
	io.Reader
	io.ReaderAt
	io.Closer
	Stat() (fs.FileInfo, error)
}

// openFile opens a stored file for Verify and for parsing images; tests
// replace it (Store.open) to inject I/O errors.
func (s *Store) openFile(path string) (storeFile, error) {
	if s.open != nil {
		return s.open(path)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	return f, nil
}

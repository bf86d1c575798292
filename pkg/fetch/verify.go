package fetch

import (
	"context"
	"fmt"
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

// VerifyReport tells what Verify checked and found.
type VerifyReport struct {
	Objects, Images int   // files checked
	Bytes           int64 // bytes hashed
	Corrupt         []Corrupt
}

// Verify re-hashes every object and image and moves each file whose digest
// is not the one its name says (or whose name is not a digest) to
// quarantine/, never deleting it, and reports it. It runs while the store is
// in use: files are only ever renamed in complete.
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
				got, n, err := hashFile(ctx, filepath.Join(s.root, j.rel))
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
					report(j, "unreadable: "+err.Error())
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
	if firstErr != nil {
		return rep, fmt.Errorf("verifying store %s: %w", s.root, firstErr)
	}
	return rep, nil
}

func hashFile(ctx context.Context, path string) (cfs.Digest, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return cfs.Digest{}, 0, err
	}
	defer f.Close()
	return cfs.VerityDigestReader(ctxReader{ctx, f})
}

type ctxReader struct {
	ctx context.Context
	r   *os.File
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

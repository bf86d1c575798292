package fetch

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// GCStats tell what one GC did.
type GCStats struct {
	ImagesRemoved  int
	ObjectsRemoved int
	BytesFreed     int64
	BytesInUse     int64 // allocated under objects/, images/ and signatures/ afterwards
	ImagesKept     int
	ObjectsKept    int
}

type storedImage struct {
	d     cfs.Digest
	bytes int64
	mtime time.Time
	objs  []cfs.Object
}

// GC frees space. Objects no stored image references are always removed.
// When MaxSize is set and the store is larger, unpinned images are removed
// least recently used first until it fits, and with them the objects no
// remaining image references. Pinned images, images an Ensure call is
// working on or used within GCGrace, and all their objects, are never
// touched: each removal re-checks, under the store's lock, against the
// images in use at that moment, so a download starting while GC runs is
// never deleted under it.
func (s *Store) GC(ctx context.Context) (GCStats, error) {
	var st GCStats
	log := klog.FromContext(ctx)

	images, err := s.listImages(ctx)
	if err != nil {
		return st, err
	}
	objects, err := s.listObjects(ctx)
	if err != nil {
		return st, err
	}
	refs := make(map[cfs.Digest]int, len(objects))
	var usage int64
	for _, im := range images {
		usage += im.bytes
		for _, o := range im.objs {
			refs[o.Digest]++
		}
	}
	for _, b := range objects {
		usage += b
	}

	// Choose images to drop, least recently used first.
	s.mu.Lock()
	grace := time.Now().Add(-s.opts.GCGrace)
	var candidates []*storedImage
	for _, im := range images {
		if lu, ok := s.lastUse[im.d]; ok && lu.After(im.mtime) {
			im.mtime = lu
		}
		if s.pins[im.d] > 0 || s.busy[im.d] > 0 || im.mtime.After(grace) {
			continue
		}
		candidates = append(candidates, im)
	}
	s.mu.Unlock()
	sort.Slice(candidates, func(i, j int) bool { return candidates[i].mtime.Before(candidates[j].mtime) })
	var drop []*storedImage
	if s.opts.MaxSize > 0 {
		for _, im := range candidates {
			if usage <= s.opts.MaxSize {
				break
			}
			drop = append(drop, im)
			usage -= im.bytes
			for _, o := range im.objs {
				if refs[o.Digest]--; refs[o.Digest] == 0 {
					usage -= objects[o.Digest]
				}
			}
		}
	}

	// Remove, re-checking each against what is in use now.
	for _, im := range drop {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		removed, err := s.removeImage(im)
		if err != nil {
			return st, err
		}
		if !removed { // got pinned or used meanwhile: keep its objects too
			for _, o := range im.objs {
				refs[o.Digest]++
			}
			continue
		}
		if err := s.removeKept(im.d); err != nil {
			return st, fmt.Errorf("GC: removing the kept signatures of image %s: %w", im.d, err)
		}
		st.ImagesRemoved++
		st.BytesFreed += im.bytes
	}
	swept, err := s.sweepKept(ctx)
	st.BytesFreed += swept
	if err != nil {
		return st, err
	}
	var garbage []cfs.Digest
	for d := range objects {
		if refs[d] == 0 {
			garbage = append(garbage, d)
		}
	}
	sort.Slice(garbage, func(i, j int) bool { return garbage[i].String() < garbage[j].String() })
	var prot protectedSet
	for _, d := range garbage {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		removed, err := s.removeObject(ctx, d, &prot)
		if err != nil {
			return st, err
		}
		if removed {
			st.ObjectsRemoved++
			st.BytesFreed += objects[d]
		}
	}
	if prot.unknown != "" {
		log.Info("Store GC kept every object", "reason", prot.unknown)
	}
	st.ImagesKept = len(images) - st.ImagesRemoved
	st.ObjectsKept = len(objects) - st.ObjectsRemoved
	st.BytesInUse, _ = s.usage()
	s.c.gcImages.Add(uint64(st.ImagesRemoved))
	s.c.gcObjects.Add(uint64(st.ObjectsRemoved))
	s.c.gcBytes.Add(uint64(st.BytesFreed))
	log.V(1).Info("store GC", "imagesRemoved", st.ImagesRemoved, "objectsRemoved", st.ObjectsRemoved,
		"bytesFreed", st.BytesFreed, "bytesInUse", st.BytesInUse)
	return st, nil
}

// protectedSet caches the objects of the images in use, rebuilt when the
// store's generation changes (an image got pinned or busy).
type protectedSet struct {
	gen     uint64
	valid   bool
	unknown string // why an image in use could not be indexed: protect everything
	objs    map[cfs.Digest]bool
}

// refresh must be called with s.mu held.
func (p *protectedSet) refresh(s *Store) {
	if p.valid && p.gen == s.gen {
		return
	}
	p.gen, p.valid, p.unknown = s.gen, true, ""
	p.objs = make(map[cfs.Digest]bool)
	grace := time.Now().Add(-s.opts.GCGrace)
	add := func(d cfs.Digest) {
		objs, ok := s.index[d]
		if !ok {
			if s.hasImageFile(d) {
				p.unknown = "image " + d.String() + " is in use but not indexed yet"
			}
			return
		}
		for _, o := range objs {
			p.objs[o.Digest] = true
		}
	}
	for d := range s.pins {
		objs, ok := s.pinObjs[d]
		if !ok {
			if objs, ok = s.index[d]; ok {
				s.pinObjs[d] = objs
			}
		}
		if !ok {
			// Mounted, but its file left the store before this process
			// read it (quarantined, or removed before a restart): which
			// objects it uses is unknown.
			p.unknown = "pinned image " + d.String() + " has no file in the store and its object list is unknown (it was quarantined or removed before this process read it): GC removes no object until it is unpinned"
			continue
		}
		for _, o := range objs {
			p.objs[o.Digest] = true
		}
	}
	for d := range s.busy {
		add(d)
	}
	for d, t := range s.lastUse {
		if t.After(grace) {
			add(d)
		}
	}
}

func (s *Store) hasImageFile(d cfs.Digest) bool {
	_, err := os.Lstat(s.ImagePath(d))
	return err == nil
}

func (s *Store) removeImage(im *storedImage) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pins[im.d] > 0 || s.busy[im.d] > 0 {
		return false, nil
	}
	if lu, ok := s.lastUse[im.d]; ok && lu.After(im.mtime) {
		return false, nil
	}
	if err := os.Remove(s.ImagePath(im.d)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("GC: removing image %s: %w", im.d, err)
	}
	delete(s.index, im.d)
	delete(s.lastUse, im.d)
	return true, nil
}

func (s *Store) removeObject(ctx context.Context, d cfs.Digest, prot *protectedSet) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	prot.refresh(s)
	if prot.unknown != "" || prot.objs[d] {
		return false, nil
	}
	// A stored image that GC did not see (it arrived meanwhile) is in use
	// (busy or within grace), hence in the protected set.
	if err := os.Remove(s.objectPath(d)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("GC: removing object %s: %w", d, err)
	}
	return true, nil
}

// listImages reads images/ and indexes every image (a file that is not a
// valid image named by its digest is quarantined).
func (s *Store) listImages(ctx context.Context) ([]*storedImage, error) {
	dir := filepath.Join(s.root, imagesDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("GC: listing %s: %w", dir, err)
	}
	var out []*storedImage
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		path := filepath.Join(dir, e.Name())
		d, err := cfs.ParseDigest(strings.TrimSuffix(e.Name(), imageSuffix))
		if err != nil || !strings.HasSuffix(e.Name(), imageSuffix) || !e.Type().IsRegular() {
			if _, err := s.quarantine(ctx, path, "not an image named by its digest"); err != nil {
				return nil, err
			}
			continue
		}
		fi, err := os.Lstat(path)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, fmt.Errorf("GC: %w", err)
		}
		objs, err := s.Objects(ctx, d)
		if err != nil {
			if errors.Is(err, ErrNotFound) {
				continue
			}
			if errors.Is(err, ErrInvalidImage) {
				if _, err := s.quarantine(ctx, path, err.Error()); err != nil {
					return nil, err
				}
				continue
			}
			return nil, fmt.Errorf("GC: %w", err)
		}
		// An image's kept signatures are its own: counted, and freed, with it.
		out = append(out, &storedImage{d: d, bytes: allocated(fi) + s.keptAllocated(d), mtime: fi.ModTime(), objs: objs})
	}
	return out, nil
}

// listObjects maps every object under objects/ to its allocated bytes.
// Files that are not named like objects are left for Verify.
func (s *Store) listObjects(ctx context.Context) (map[cfs.Digest]int64, error) {
	root := filepath.Join(s.root, objectsDir)
	out := make(map[cfs.Digest]int64)
	subs, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("GC: listing %s: %w", root, err)
	}
	for _, sub := range subs {
		if !sub.IsDir() || len(sub.Name()) != 2 {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		ents, err := os.ReadDir(filepath.Join(root, sub.Name()))
		if err != nil {
			return nil, fmt.Errorf("GC: listing %s: %w", sub.Name(), err)
		}
		for _, e := range ents {
			d, err := cfs.ParseObjectPath(sub.Name() + "/" + e.Name())
			if err != nil || !e.Type().IsRegular() {
				continue
			}
			fi, err := e.Info()
			if err != nil {
				continue
			}
			out[d] = allocated(fi)
		}
	}
	return out, nil
}

// allocated returns the bytes a file occupies on disk.
func allocated(fi fs.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// usage returns the bytes allocated under objects/, images/ and
// signatures/ (what MaxSize bounds).
func (s *Store) usage() (int64, error) {
	u, err := DiskUsage(context.Background(), s.root)
	return u.Objects.Bytes + u.Images.Bytes + u.Signatures.Bytes, err
}

// Usage counts files and allocated bytes of one part of a store.
type Usage struct {
	Files int64
	Bytes int64
}

// StoreUsage is what `store du` shows. Signatures are the kept
// signatures of stored images (signatures/).
type StoreUsage struct {
	Objects, Images, Signatures, Tmp, Quarantine Usage
}

// DiskUsage measures the store at root; it needs no lock and can run while
// the plugin uses the store.
func DiskUsage(ctx context.Context, root string) (StoreUsage, error) {
	var u StoreUsage
	parts := []struct {
		dir string
		u   *Usage
	}{{objectsDir, &u.Objects}, {imagesDir, &u.Images}, {signaturesDir, &u.Signatures}, {tmpDir, &u.Tmp}, {quarantineDir, &u.Quarantine}}
	for _, p := range parts {
		err := filepath.WalkDir(filepath.Join(root, p.dir), func(path string, e fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			if e.Type().IsRegular() {
				fi, err := e.Info()
				if err != nil {
					return nil // removed meanwhile
				}
				p.u.Files++
				p.u.Bytes += allocated(fi)
			}
			return nil
		})
		if err != nil {
			return u, fmt.Errorf("measuring %s: %w", root, err)
		}
	}
	return u, nil
}

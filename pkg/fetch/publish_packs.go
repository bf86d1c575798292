package fetch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/pack"
)

// PackOptions make PublishImage write packs (WithPacks).
type PackOptions struct {
	// MaxObject: objects up to this size are packed; larger ones are
	// fetched each with its own request. 0 = DefaultPackMaxObject.
	MaxObject int64
	// PackSize: new packs are cut at this size. 0 = DefaultPackSize.
	PackSize int64
}

// Defaults of PackOptions.
const (
	DefaultPackMaxObject = 1 << 20
	DefaultPackSize      = 64 << 20
	// packReuseShare: a pack of the repository is reused when at least
	// this share of the bytes of its objects (as its indexes list them)
	// are the new image's; the image's other objects go to new packs.
	packReuseShare = 0.5
	// maxReuseIndexes: reuse looks at the packs named by this many of the
	// repository's pack indexes, the most recently written: what a build
	// reads and holds stays bounded however many images the repository
	// keeps, and a new version's objects are in its recent predecessors'.
	maxReuseIndexes = 64
)

// WithPacks makes PublishImage pack the image's small objects into
// REPO/packs/ (reusing the packs the repository has that hold them) and
// write the image's pack index, REPO/packs/<digest>.idx, before the image.
func WithPacks(o PackOptions) PublishOption {
	return func(po *publishOptions) {
		if o.MaxObject <= 0 {
			o.MaxObject = DefaultPackMaxObject
		}
		if o.PackSize <= 0 {
			o.PackSize = DefaultPackSize
		}
		po.packs = &o
	}
}

// PackStats tell what publishPacks did.
type PackStats struct {
	Objects     int // packed objects of the image
	ReusedPacks int // packs of the repository its index names
	NewPacks    int // packs written
	NewBytes    int64
}

// treeObjects lists the distinct objects of a built tree, by digest.
func treeObjects(root *cfs.Node) []cfs.Object {
	objs := root.Objects(nil)
	sort.Slice(objs, func(i, j int) bool { return bytes.Compare(objs[i].Digest[:], objs[j].Digest[:]) < 0 })
	return objs
}

// knownPack is a pack of the repository and the objects its indexes
// list in it.
type knownPack struct {
	ref     pack.PackRef
	entries map[cfs.Digest]pack.Entry // Pack unset
	total   uint64
}

// repoPacks reads the maxReuseIndexes most recent pack indexes of the
// repository (one that does not decode is skipped, with a warning) and
// returns the packs they name that are in packs/ with their size.
func repoPacks(ctx context.Context, dir string) ([]*knownPack, error) {
	log := klog.FromContext(ctx)
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	present := make(map[string]bool)
	type indexFile struct {
		name string
		mod  time.Time
	}
	var idx []indexFile
	for _, e := range ents {
		present[e.Name()] = true
		if !strings.HasSuffix(e.Name(), ".idx") || !e.Type().IsRegular() {
			continue
		}
		fi, err := e.Info()
		if err != nil || fi.Size() > pack.MaxIndexBytes {
			log.Info("Skipping a pack index", "path", filepath.Join(dir, e.Name()), "err", err)
			continue
		}
		idx = append(idx, indexFile{e.Name(), fi.ModTime()})
	}
	sort.Slice(idx, func(i, j int) bool {
		if !idx[i].mod.Equal(idx[j].mod) {
			return idx[i].mod.After(idx[j].mod)
		}
		return idx[i].name < idx[j].name
	})
	if len(idx) > maxReuseIndexes {
		log.V(2).Info("Reusing the packs of the most recent pack indexes only", "indexes", len(idx), "read", maxReuseIndexes)
		idx = idx[:maxReuseIndexes]
	}
	byHash := make(map[[sha256.Size]byte]*knownPack)
	for _, e := range idx {
		b, err := os.ReadFile(filepath.Join(dir, e.name))
		if err != nil {
			return nil, err
		}
		x, err := pack.DecodeRepoIndex(b)
		if err != nil {
			log.Info("Skipping a pack index that does not decode", "path", filepath.Join(dir, e.name), "err", err)
			continue
		}
		for _, en := range x.Index.Entries {
			ref := x.Packs[en.Pack]
			kp := byHash[ref.SHA256]
			if kp == nil {
				if !present[ref.Name()] {
					continue
				}
				fi, err := os.Stat(filepath.Join(dir, ref.Name()))
				if err != nil || fi.Size() != ref.Size {
					continue
				}
				kp = &knownPack{ref: ref, entries: make(map[cfs.Digest]pack.Entry)}
				byHash[ref.SHA256] = kp
			}
			if kp.ref.Size != ref.Size {
				continue
			}
			if _, ok := kp.entries[en.Digest]; !ok {
				en.Pack = 0
				kp.entries[en.Digest] = en
				kp.total += en.Size
			}
		}
	}
	packs := make([]*knownPack, 0, len(byHash))
	for _, kp := range byHash {
		packs = append(packs, kp)
	}
	sort.Slice(packs, func(i, j int) bool { return bytes.Compare(packs[i].ref.SHA256[:], packs[j].ref.SHA256[:]) < 0 })
	return packs, nil
}

// publishPacks writes the pack index of image (objects in objects/)
// into packs/: the packed objects are those up to o.MaxObject; packs of
// the repository that hold at least packReuseShare of their bytes in them
// are reused, most needed first; the others go to new packs, in digest
// order, cut at o.PackSize. Packs and the index are written beside and
// renamed into place, world-readable.
func publishPacks(ctx context.Context, repo string, image cfs.Digest, objs []cfs.Object, o PackOptions) (PackStats, error) {
	var st PackStats
	dir := filepath.Join(repo, "packs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return st, err
	}
	need := make(map[cfs.Digest]cfs.Object)
	for _, ob := range objs {
		if int64(ob.Size) <= o.MaxObject {
			need[ob.Digest] = ob
		}
	}
	st.Objects = len(need)
	if len(need) == 0 {
		return st, nil
	}
	known, err := repoPacks(ctx, dir)
	if err != nil {
		return st, err
	}
	// Reuse: the packs most needed first.
	live := func(kp *knownPack, placed map[cfs.Digest]pack.Entry) uint64 {
		var n uint64
		for d, e := range kp.entries {
			if _, ok := need[d]; ok {
				if _, done := placed[d]; !done {
					n += e.Size
				}
			}
		}
		return n
	}
	placed := make(map[cfs.Digest]pack.Entry, len(need))
	var refs []pack.PackRef
	first := make(map[*knownPack]uint64, len(known))
	for _, kp := range known {
		first[kp] = live(kp, placed)
	}
	sort.SliceStable(known, func(i, j int) bool { return first[known[i]] > first[known[j]] })
	for _, kp := range known {
		l := live(kp, placed)
		if l == 0 || float64(l) < packReuseShare*float64(kp.total) {
			continue
		}
		num := len(refs)
		refs = append(refs, kp.ref)
		for d, e := range kp.entries {
			if _, ok := need[d]; ok {
				if _, done := placed[d]; !done {
					e.Pack = num
					placed[d] = e
				}
			}
		}
	}
	st.ReusedPacks = len(refs)
	// New packs for the rest.
	var rest []cfs.Object
	for _, ob := range objs {
		if _, ok := need[ob.Digest]; ok {
			if _, done := placed[ob.Digest]; !done {
				rest = append(rest, ob)
			}
		}
	}
	open := func(ob cfs.Object) (io.ReadCloser, error) {
		return os.Open(filepath.Join(repo, "objects", ob.Digest.ObjectPath()))
	}
	for _, objs := range pack.Cut(rest, o.PackSize) {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		ref, offs, err := writePackFile(dir, objs, open)
		if err != nil {
			return st, err
		}
		num := len(refs)
		refs = append(refs, ref)
		for i, ob := range objs {
			placed[ob.Digest] = pack.Entry{Digest: ob.Digest, Size: ob.Size, Pack: num, Offset: offs[i]}
		}
		st.NewPacks++
		st.NewBytes += ref.Size
	}
	x := pack.RepoIndex{Image: image, Packs: refs, Index: pack.Index{Packs: len(refs)}}
	for _, e := range placed {
		x.Index.Entries = append(x.Index.Entries, e)
	}
	b, err := pack.EncodeRepoIndex(x)
	if err != nil {
		return st, err
	}
	return st, writeFileAtomic(filepath.Join(dir, PackIndexName(image)), func(w io.Writer) error {
		_, err := w.Write(b)
		return err
	})
}

// writePackFile writes the pack of objs to dir/<sha256>.tar.
func writePackFile(dir string, objs []cfs.Object, open func(cfs.Object) (io.ReadCloser, error)) (pack.PackRef, []int64, error) {
	var ref pack.PackRef
	var offs []int64
	tmp, err := os.CreateTemp(dir, ".pack-*")
	if err != nil {
		return ref, nil, err
	}
	defer os.Remove(tmp.Name())
	h := sha256.New()
	offs, ref.Size, err = pack.Write(io.MultiWriter(tmp, h), objs, open)
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return ref, nil, fmt.Errorf("writing a pack: %w", err)
	}
	copy(ref.SHA256[:], h.Sum(nil))
	if err := os.Rename(tmp.Name(), filepath.Join(dir, ref.Name())); err != nil {
		return ref, nil, fmt.Errorf("writing a pack: %w", err)
	}
	return ref, offs, nil
}

// writeFileAtomic writes path through a temporary beside it.
func writeFileAtomic(path string, write func(io.Writer) error) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".new-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	err = write(tmp)
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

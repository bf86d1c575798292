package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// Record is what the driver remembers about one published target. State
// is kept per target path, not per volume: two pods may mount one PV.
type Record struct {
	Target   string `json:"target"`
	VolumeID string `json:"volumeID"`
	// Key is VolumeSpec.Key() of the publish: a later publish of the same
	// key at this target is a repeat, another key is a conflict.
	Key    string         `json:"key"`
	Image  string         `json:"image"` // image digest (hex)
	Source string         `json:"source"`
	Name   string         `json:"name,omitempty"`
	Verity cfs.VerityMode `json:"verity"`
	// CreatedDir: the driver made the target directory (and removes it);
	// a directory it did not make stays.
	CreatedDir bool      `json:"createdDir"`
	Pod        string    `json:"pod,omitempty"` // namespace/name, for logs
	Published  time.Time `json:"published"`
	// Publish is what the publish asked for beyond the content, so that a
	// repeat with other flags, access mode or readonly is refused. Records
	// written before it was kept have none: then noexec is compared with
	// what the mount shows.
	Publish *PublishParams `json:"publish,omitempty"`
}

// PublishParams are the parts of a NodePublishVolume request besides the
// volume context that make two publishes at one target compatible.
type PublishParams struct {
	MountFlags []string `json:"mountFlags,omitempty"` // as given, sorted, without repeats
	AccessMode string   `json:"accessMode"`
	Readonly   bool     `json:"readonly"`
}

// publishParams reads the parameters of req.
func publishParams(req *csi.NodePublishVolumeRequest) *PublishParams {
	flags := slices.Clone(req.GetVolumeCapability().GetMount().GetMountFlags())
	slices.Sort(flags)
	return &PublishParams{
		MountFlags: slices.Compact(flags),
		AccessMode: req.GetVolumeCapability().GetAccessMode().GetMode().String(),
		Readonly:   req.GetReadonly(),
	}
}

// incompatibility says how p differs from what r was published with (""
// when it does not); mi is the mount at the target.
func (r Record) incompatibility(p *PublishParams, mi cfs.MountInfo) string {
	if r.Publish == nil { // an older record: the mount tells noexec
		if want := slices.Contains(p.MountFlags, "noexec"); mi.HasOption("noexec") != want {
			return fmt.Sprintf("mounted with noexec=%v, asked for noexec=%v", !want, want)
		}
		return ""
	}
	switch {
	case !slices.Equal(r.Publish.MountFlags, p.MountFlags):
		return fmt.Sprintf("published with mount_flags %q, asked for %q", r.Publish.MountFlags, p.MountFlags)
	case r.Publish.AccessMode != p.AccessMode:
		return fmt.Sprintf("published with access mode %s, asked for %s", r.Publish.AccessMode, p.AccessMode)
	case r.Publish.Readonly != p.Readonly:
		return fmt.Sprintf("published with readonly=%v, asked for readonly=%v", r.Publish.Readonly, p.Readonly)
	}
	return ""
}

func (r Record) digest() (cfs.Digest, error) { return cfs.ParseDigest(r.Image) }

// stateStore keeps one JSON file per target in dir, each written
// atomically (temporary file, fsync, rename, fsync of the directory), so
// that publishes of different targets do not serialise on one file.
type stateStore struct {
	dir  string
	mu   sync.Mutex
	recs map[string]Record
}

const stateSuffix = ".json"

// openState loads the records in dir (creating it), dropping leftovers of
// interrupted writes. A record that cannot be read is renamed aside with a
// ".bad" suffix and reported, never silently lost.
func openState(dir string) (*stateStore, []error, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("opening driver state %s: %w", dir, err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("opening driver state %s: %w", dir, err)
	}
	s := &stateStore{dir: dir, recs: make(map[string]Record)}
	var bad []error
	for _, e := range ents {
		name := e.Name()
		p := filepath.Join(dir, name)
		switch {
		case strings.HasPrefix(name, ".tmp-"):
			_ = os.Remove(p)
		case strings.HasSuffix(name, stateSuffix):
			var r Record
			data, err := os.ReadFile(p)
			if err == nil {
				err = json.Unmarshal(data, &r)
			}
			if err == nil && (r.Target == "" || stateFile(r.Target) != name) {
				err = errors.New("target does not match the file name")
			}
			if err == nil {
				_, err = r.digest()
			}
			if err != nil {
				bad = append(bad, fmt.Errorf("driver state %s: %w (renamed to .bad)", p, err))
				_ = os.Rename(p, p+".bad")
				continue
			}
			s.recs[r.Target] = r
		}
	}
	return s, bad, nil
}

// stateFile names the file of a target.
func stateFile(target string) string {
	h := sha256.Sum256([]byte(target))
	return hex.EncodeToString(h[:16]) + stateSuffix
}

func (s *stateStore) get(target string) (Record, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.recs[target]
	return r, ok
}

// all returns the records sorted by target.
func (s *stateStore) all() []Record {
	s.mu.Lock()
	out := make([]Record, 0, len(s.recs))
	for _, r := range s.recs {
		out = append(out, r)
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Target < out[j].Target })
	return out
}

func (s *stateStore) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.recs)
}

// put persists r durably, then remembers it.
func (s *stateStore) put(r Record) error {
	data, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("saving state of %s: %w", r.Target, err)
	}
	f, err := os.CreateTemp(s.dir, ".tmp-")
	if err != nil {
		return fmt.Errorf("saving state of %s: %w", r.Target, err)
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("saving state of %s: %w", r.Target, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("saving state of %s: %w", r.Target, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("saving state of %s: %w", r.Target, err)
	}
	if err := os.Rename(f.Name(), filepath.Join(s.dir, stateFile(r.Target))); err != nil {
		return fmt.Errorf("saving state of %s: %w", r.Target, err)
	}
	ok = true
	if err := syncDir(s.dir); err != nil {
		return fmt.Errorf("saving state of %s: %w", r.Target, err)
	}
	s.mu.Lock()
	s.recs[r.Target] = r
	s.mu.Unlock()
	return nil
}

// remove forgets target. Forgetting an unknown target is not an error.
func (s *stateStore) remove(target string) error {
	err := os.Remove(filepath.Join(s.dir, stateFile(target)))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing state of %s: %w", target, err)
	}
	// No fsync of the directory: if a crash brings the record back, its
	// mount is gone and recovery drops it.
	s.mu.Lock()
	delete(s.recs, target)
	s.mu.Unlock()
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

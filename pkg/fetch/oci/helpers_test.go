package oci

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-composefs/csi-composefs/internal/testoci"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// testRegistry is a registry on loopback (internal/testoci).
type testRegistry struct {
	*testoci.Registry
	host string
}

func newTestRegistry(t *testing.T) *testRegistry {
	t.Helper()
	r := testoci.NewRegistry(t, testoci.Options{})
	return &testRegistry{Registry: r, host: r.Host}
}

func (r *testRegistry) reset() { r.Reset() }

func (r *testRegistry) counts() (requests, blobGets int, blobBytes int64) {
	c := r.Counts()
	return c.Requests, c.BlobGets, c.BlobBytes
}

func (r *testRegistry) ref(t *testing.T, s string) Reference {
	t.Helper()
	ref, err := ParseReference("oci://" + r.host + "/" + s)
	if err != nil {
		t.Fatal(err)
	}
	return ref
}

func (r *testRegistry) client(t *testing.T, ref Reference) *Client {
	t.Helper()
	c, err := NewClient(ref, Options{Insecure: []string{r.host}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// writeTree writes files named f0000… of random sizes (seeded) under dir:
// shared[i] picks the content seed of file i.
func writeTree(t testing.TB, dir string, seeds []uint64, size func(i int) int) {
	t.Helper()
	for i, seed := range seeds {
		p := filepath.Join(dir, fmt.Sprintf("d%02d", i%7), fmt.Sprintf("f%04d", i))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, size(i))
		rng := rand.New(rand.NewPCG(seed, 7))
		for j := 0; j < len(b); j += 8 {
			v := rng.Uint64()
			for k := j; k < min(j+8, len(b)); k++ {
				b[k] = byte(v >> (8 * (k - j)))
			}
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func pushDir(t *testing.T, c *Client, dir string, opts PushOptions) PushResult {
	t.Helper()
	in, err := InputFromDir(context.Background(), dir, cfs.DirOptions{}, cfs.WriteOptions{MinVersion: 1, MaxVersion: 1})
	if err != nil {
		t.Fatal(err)
	}
	res, err := Push(context.Background(), c, in, opts)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func openStore(t *testing.T) *fetch.Store {
	t.Helper()
	s, err := fetch.Open(context.Background(), t.TempDir(), fetch.Options{Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// checkObjects compares every object of image with the files of dir.
func checkObjects(t *testing.T, s *fetch.Store, image cfs.Digest, dir string) {
	t.Helper()
	objs, err := s.Objects(context.Background(), image)
	if err != nil {
		t.Fatal(err)
	}
	want := make(map[cfs.Digest][]byte)
	_ = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && fi.Size() > cfs.DirInlineContentMax {
			b, _ := os.ReadFile(p)
			h := cfs.NewVerityHash()
			h.Write(b)
			want[h.Digest()] = b
		}
		return nil
	})
	if len(objs) != len(want) {
		t.Fatalf("image has %d objects, the tree %d", len(objs), len(want))
	}
	for _, o := range objs {
		got, err := os.ReadFile(filepath.Join(s.ObjectsDir(), o.Digest.ObjectPath()))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[o.Digest]) {
			t.Fatalf("object %s differs from its file", o.Digest)
		}
	}
}

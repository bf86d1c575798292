package cfs

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// makeRealdirTree recreates under dir the source tree of the realdir golden
// vectors, following the recipe in testdata/composefs/README.md.
func makeRealdirTree(t testing.TB, dir string) {
	t.Helper()
	T := func(p string) string { return filepath.Join(dir, p) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(T("subdir/deeper"), 0o755))
	must(os.MkdirAll(T("emptydir"), 0o755))
	must(os.WriteFile(T("empty"), nil, 0o644))
	must(os.WriteFile(T("one"), []byte("A"), 0o644))
	for _, n := range []int{64, 65, 4095, 4096, 5000, 1048576} {
		must(os.WriteFile(T("f"+strconv.Itoa(n)), pattern(n, 251), 0o644))
	}
	must(os.WriteFile(T("subdir/deeper/dup-of-f5000"), pattern(5000, 251), 0o644))
	must(os.Link(T("f4095"), T("hardlink-to-f4095")))
	must(os.Symlink("f4096", T("link-to-f4096")))
	must(os.Symlink("/absolute/target/that/does/not/exist", T("abs-link")))
	must(os.WriteFile(T("subdir/hello.txt"), []byte("hello sub\n"), 0o644))
	must(unix.Mkfifo(T("fifo"), 0o640))
	must(unix.Mknod(T("chardev"), unix.S_IFCHR|0o620, int(unix.Mkdev(1, 3))))
	must(unix.Mknod(T("blockdev"), unix.S_IFBLK|0o660, int(unix.Mkdev(7, 0))))
	must(unix.Mknod(T("whiteout"), unix.S_IFCHR|0o644, 0))
	for _, p := range []string{"fifo", "chardev", "blockdev", "whiteout"} {
		must(os.Chmod(T(p), map[string]os.FileMode{"fifo": 0o640, "chardev": 0o620, "blockdev": 0o660, "whiteout": 0o644}[p]))
	}
	if err := unix.Lsetxattr(T("one"), "user.test", []byte("some value"), 0); err != nil {
		t.Skipf("filesystem of the temporary directory has no user xattrs: %v", err)
	}
	must(unix.Lsetxattr(T("f5000"), "user.other", []byte{0x00, 0xff, 0x10}, 0))
	must(unix.Lsetxattr(T("subdir"), "trusted.overlay.opaque", []byte("y"), 0))
	must(filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, 0, 0)
	}))
	must(os.Lchown(T("f4096"), 1000, 1000))
	must(os.Lchown(T("link-to-f4096"), 1000, 1000))
	must(os.Lchown(T("f1048576"), 65536, 70000))
	for p, m := range map[string]os.FileMode{
		"": 0o755, "subdir/deeper": 0o755, "emptydir": 0o755, "subdir": 0o1777 | os.ModeSticky,
		"f64": 0o755 | os.ModeSetuid, "f65": 0o600, "f4095": 0o444,
	} {
		must(os.Chmod(T(p), m))
	}
	utc := func(s string) unix.Timespec {
		tm, err := time.Parse("2006-01-02 15:04:05.999999999", s)
		must(err)
		return unix.NsecToTimespec(tm.UnixNano())
	}
	setTime := func(p string, ts unix.Timespec) {
		must(unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW))
	}
	var all []string
	must(filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		all = append(all, p)
		return err
	}))
	sort.Sort(sort.Reverse(sort.StringSlice(all))) // children before parents, like find -depth
	for _, p := range all {
		setTime(p, utc("2020-01-01 00:00:00"))
	}
	setTime(T("f4096"), utc("2001-02-03 04:05:06.123456789"))
	setTime(T("link-to-f4096"), utc("2001-02-03 04:05:06.123456789"))
	setTime(T("one"), utc("1999-12-31 23:59:59.5"))
	setTime(T("f1048576"), utc("2030-06-15 12:00:00.000000001"))
}

func TestWriterGoldenFromDirectory(t *testing.T) {
	requireRoot(t)
	for _, g := range goldenImages(t) {
		if !g.fromDir {
			continue
		}
		t.Run(g.name, func(t *testing.T) {
			tree := filepath.Join(t.TempDir(), "tree")
			makeRealdirTree(t, tree)
			store := filepath.Join(t.TempDir(), "objects")
			root, err := BuildFromDir(context.Background(), tree, DirOptions{DigestStore: store, Threads: 3})
			if err != nil {
				t.Fatalf("BuildFromDir: %v", err)
			}
			var buf bytes.Buffer
			d, err := WriteImage(&buf, root, g.opts)
			if err != nil {
				t.Fatal(err)
			}
			if want := readGolden(t, g.name+".cfs"); !bytes.Equal(buf.Bytes(), want) {
				t.Errorf("image differs from %s.cfs: %s", g.name, firstDiff(buf.Bytes(), want))
			}
			if want := strings.TrimSpace(string(readGolden(t, g.name+".digest"))); d.String() != want {
				t.Errorf("digest %s, want %s", d, want)
			}
			// The digest store holds exactly the listed objects, each under its digest, mode 0644.
			var got []string
			err = filepath.Walk(store, func(p string, fi os.FileInfo, err error) error {
				if err != nil || fi.IsDir() {
					return err
				}
				rel, _ := filepath.Rel(store, p)
				got = append(got, rel)
				if fi.Mode().Perm() != 0o644 {
					t.Errorf("object %s has mode %o, want 0644", rel, fi.Mode().Perm())
				}
				if err := checkObject(p, mustParseObjectPath(t, rel)); err != nil {
					t.Errorf("object %s: %v", rel, err)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			want := strings.Fields(string(readGolden(t, g.name+".objects")))
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Errorf("store holds %v, want %v", got, want)
			}
		})
	}
}

func mustParseObjectPath(t testing.TB, p string) Digest {
	t.Helper()
	d, err := ParseObjectPath(p)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestDigestStoreHardlinkConcurrent stores many identical files with
// hardlinks from parallel workers: no worker may lose its link, and no
// temporary name may stay behind.
func TestDigestStoreHardlinkConcurrent(t *testing.T) {
	src := t.TempDir()
	for i := 0; i < 64; i++ {
		if err := os.WriteFile(filepath.Join(src, "f"+strconv.Itoa(i)), pattern(65536, 251), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	store := filepath.Join(filepath.Dir(src), "objects-"+filepath.Base(src)) // same filesystem as src
	t.Cleanup(func() { os.RemoveAll(store) })
	for round := 0; round < 5; round++ {
		if _, err := BuildFromDir(context.Background(), src, DirOptions{DigestStore: store, HardlinkObjects: true, Threads: 16}); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		os.RemoveAll(store)
	}
	if _, err := BuildFromDir(context.Background(), src, DirOptions{DigestStore: store, HardlinkObjects: true, Threads: 16}); err != nil {
		t.Fatal(err)
	}
	left, _ := filepath.Glob(filepath.Join(store, ".tmp-*"))
	objs, _ := filepath.Glob(filepath.Join(store, "*", "*"))
	if len(left) != 0 || len(objs) != 1 {
		t.Fatalf("store holds temporaries %v and objects %v, want none and one", left, objs)
	}
}

// TestBuildRefusesSwappedFiles: a file replaced by a symlink or a FIFO
// between the walk and the hashing is refused, not followed or waited on.
func TestBuildRefusesSwappedFiles(t *testing.T) {
	for _, swap := range []string{"symlink", "fifo"} {
		t.Run(swap, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "f")
			if err := os.WriteFile(p, pattern(100, 251), 0o644); err != nil {
				t.Fatal(err)
			}
			b := dirBuilder{}
			n, err := b.node(p, "f")
			if err != nil || len(b.files) != 1 {
				t.Fatalf("node: %v, jobs %d", err, len(b.files))
			}
			os.Remove(p)
			if swap == "symlink" {
				err = os.Symlink("/etc/hostname", p)
			} else {
				err = unix.Mkfifo(p, 0o644)
			}
			if err != nil {
				t.Fatal(err)
			}
			w := &hashWorker{h: NewVerityHash(), buf: make([]byte, 4096)}
			if err := b.hashFile(context.Background(), w, b.files[0]); err == nil {
				t.Fatalf("hashed a file swapped for a %s (content %q)", swap, n.Content)
			}
		})
	}
}

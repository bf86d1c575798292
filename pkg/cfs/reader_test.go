package cfs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"strconv"
	"strings"
	"testing"
)

// rdGoldenImageNames returns the *.cfs names (without extension) of the golden
// vectors; new vectors are picked up automatically.
func rdGoldenImageNames(t testing.TB) []string {
	var names []string
	for _, g := range goldenImages(t) {
		names = append(names, g.name)
	}
	return names
}

func rdOpenBytes(b []byte, opts OpenOptions) (*Image, error) {
	return Open(bytes.NewReader(b), int64(len(b)), opts)
}

func rdMustOpen(t testing.TB, b []byte, opts OpenOptions) *Image {
	t.Helper()
	img, err := rdOpenBytes(b, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return img
}

var rdLenient = OpenOptions{AllowForeignRedirects: true}

// rdCReaderRedirectBug reports whether composefs-info's redirect off-by-one
// (format notes §2.15: it skips the leading '/' but increments the length,
// so the payload picks up the bytes after the value up to the next NUL) can
// change the dump of img: only a redirect whose length is a multiple of 4 is
// followed by a non-padding byte.
func rdCReaderRedirectBug(t *testing.T, img *Image) bool {
	bug := false
	img.Root().Walk(func(n *Node) error {
		if n.LinkTo != nil || n.Type() != ModeRegular || n.Payload == "" {
			return nil
		}
		nid, _ := img.Nid(n)
		ri, err := img.Inode(nid)
		if err != nil {
			t.Fatal(err)
		}
		if len(ri.Redirect) > 1 && len(ri.Redirect)%4 == 0 {
			bug = true
		}
		return nil
	})
	return bug
}

// rdEqualModuloRedirectBug compares dumps line by line, allowing the C payload
// field to carry extra bytes after ours (the §2.15 off-by-one).
func rdEqualModuloRedirectBug(got, want string) bool {
	gl, wl := strings.Split(got, "\n"), strings.Split(want, "\n")
	if len(gl) != len(wl) {
		return false
	}
	for i := range gl {
		if gl[i] == wl[i] {
			continue
		}
		gf, wf := strings.Split(gl[i], " "), strings.Split(wl[i], " ")
		if len(gf) != len(wf) || len(gf) < 9 {
			return false
		}
		for j := range gf {
			if j == 8 {
				if !strings.HasPrefix(wf[j], gf[j]) {
					return false
				}
			} else if gf[j] != wf[j] {
				return false
			}
		}
	}
	return true
}

func TestReaderGolden(t *testing.T) {
	for _, name := range rdGoldenImageNames(t) {
		t.Run(name, func(t *testing.T) {
			data := readGolden(t, name+".cfs")
			img := rdMustOpen(t, data, rdLenient)

			var objs strings.Builder
			for _, o := range img.Objects() {
				objs.WriteString(o.Path + "\n")
				if d, err := ParseObjectPath(o.Path); (err == nil) != !o.Digest.IsZero() || (err == nil && d != o.Digest) {
					t.Errorf("object %s: digest %s", o.Path, o.Digest)
				}
			}
			if want := string(readGolden(t, name+".objects")); objs.String() != want {
				t.Errorf("Objects:\n%s\nwant:\n%s", objs.String(), want)
			}

			var dump bytes.Buffer
			if err := WriteDump(&dump, img.Root()); err != nil {
				t.Fatal(err)
			}
			want := string(readGolden(t, name+".info.dump"))
			if got := dump.String(); got != want {
				if rdCReaderRedirectBug(t, img) && rdEqualModuloRedirectBug(got, want) {
					t.Logf("dump differs from %s.info.dump only by the C reader's redirect off-by-one (§2.15)", name)
				} else {
					t.Errorf("dump differs from %s.info.dump:\n%s", name, rdFirstLineDiff(got, want))
				}
			}

			// Every path resolves to its node.
			n := 0
			img.Root().Walk(func(node *Node) error {
				got, err := img.Lookup(node.Path())
				if err != nil || got != node {
					t.Errorf("Lookup(%q) = %v, %v", node.Path(), got, err)
				}
				n++
				return nil
			})
			st := img.Stats()
			if st.Entries != uint64(n) {
				t.Errorf("Stats.Entries %d, tree has %d", st.Entries, n)
			}
			if st.Objects != len(img.Objects()) || st.ImageSize != int64(len(data)) {
				t.Errorf("Stats %+v", st)
			}
			if _, err := img.Lookup("/no/such/path"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("Lookup of a missing path: %v", err)
			}

			// Strict mode refuses only the image with foreign redirects.
			_, err := rdOpenBytes(data, OpenOptions{})
			if name == "inline-tail" {
				if !errors.Is(err, ErrForeignRedirect) {
					t.Errorf("strict Open = %v, want ErrForeignRedirect", err)
				} else if !strings.Contains(err.Error(), "/meta-") {
					t.Errorf("strict error does not name the path: %v", err)
				}
			} else if err != nil {
				t.Errorf("strict Open: %v", err)
			}
		})
	}
}

func rdFirstLineDiff(got, want string) string {
	gl, wl := strings.Split(got, "\n"), strings.Split(want, "\n")
	for i := 0; i < len(gl) || i < len(wl); i++ {
		var g, w string
		if i < len(gl) {
			g = gl[i]
		}
		if i < len(wl) {
			w = wl[i]
		}
		if g != w {
			return "line " + strconv.Itoa(i+1) + ":\n got: " + truncateForError(g) + "\nwant: " + truncateForError(w)
		}
	}
	return "(no line differs)"
}

func TestReaderDetails(t *testing.T) {
	img := rdMustOpen(t, readGolden(t, "basic.cfs"), OpenOptions{})
	if img.Version() != 0 || img.HasACL() {
		t.Errorf("version %d acl %v", img.Version(), img.HasACL())
	}
	tests := []struct {
		path    string
		mode    uint32
		size    uint64
		payload string
		content string
		digest  string
		rdev    uint64
	}{
		{path: "/", mode: ModeDir | 0o755, size: 4096},
		{path: "/inline", mode: ModeRegular | 0o644, size: 12, content: "hello world\n"},
		{path: "/dir/ext-4095", mode: ModeRegular | 0o644, size: 4095,
			payload: "5f/4953aad672b0188023d6cd6fbce9d09508eb7dad165b6298ce0086bc1e72db",
			digest:  "5f4953aad672b0188023d6cd6fbce9d09508eb7dad165b6298ce0086bc1e72db"},
		{path: "/symlink-abs", mode: ModeSymlink | 0o777, size: 23, payload: "/usr/share/zoneinfo/UTC"},
		{path: "/bigdev", mode: ModeChar | 0o600, rdev: Makedev(300, 70000)},
		{path: "dir/../blk", mode: ModeBlock | 0o660, rdev: Makedev(8, 1)},
	}
	for _, tc := range tests {
		n, err := img.Lookup(tc.path)
		if err != nil {
			t.Errorf("%s: %v", tc.path, err)
			continue
		}
		var dg string
		if n.Digest != nil {
			dg = n.Digest.String()
		}
		if n.Mode != tc.mode || n.Size != tc.size || n.Payload != tc.payload || string(n.Content) != tc.content || dg != tc.digest || n.Rdev != tc.rdev {
			t.Errorf("%s: mode %o size %d payload %q content %q digest %q rdev %d", tc.path, n.Mode, n.Size, n.Payload, n.Content, dg, n.Rdev)
		}
	}
	st := img.Stats()
	if st.ExternalFiles != 5 || st.Symlinks != 2 || st.Dirs != 2 || st.SuperblockInodes < st.Inodes {
		t.Errorf("stats %+v", st)
	}

	// Hardlinks and whiteouts.
	hw := rdMustOpen(t, readGolden(t, "hardlink-whiteout.cfs"), OpenOptions{})
	if hw.Version() != 1 {
		t.Errorf("hardlink-whiteout version %d", hw.Version())
	}
	alias, _ := hw.Lookup("/data")
	primary, _ := hw.Lookup("/a-link")
	if alias == nil || alias.LinkTo != primary || primary.LinkTo != nil {
		t.Errorf("/data should alias /a-link: %+v", alias)
	}
	if wh, _ := hw.Lookup("/wh/deleted2"); wh == nil || !wh.IsWhiteout() {
		t.Errorf("/wh/deleted2 is not a whiteout: %+v", wh)
	}
	if hw.Root().Child("00") != nil {
		t.Error("automatic whiteout /00 is visible")
	}
	if st := hw.Stats(); st.Hardlinks != 3 || st.Whiteouts != 3 {
		t.Errorf("stats %+v", st)
	}
	ri, err := hw.Inode(hw.RootNid())
	if err != nil || ri.Type() != ModeDir || len(ri.Dirents) < 258 {
		t.Fatalf("root inode: %v %+v", err, ri)
	}
	if _, ok := hw.Nid(alias); !ok {
		t.Error("no nid for an alias")
	}

	xa := rdMustOpen(t, readGolden(t, "xattrs.cfs"), OpenOptions{})
	if !xa.HasACL() {
		t.Error("xattrs.cfs: HasACL false")
	}
}

// ---- hostile images, made by mutating golden ones ----

func rdLe32(b []byte, off int64, v uint32) { binary.LittleEndian.PutUint32(b[off:], v) }
func rdLe16(b []byte, off int64, v uint16) { binary.LittleEndian.PutUint16(b[off:], v) }
func rdLe64(b []byte, off int64, v uint64) { binary.LittleEndian.PutUint64(b[off:], v) }

// rdInodeOf returns the raw inode behind path in img.
func rdInodeOf(t *testing.T, img *Image, path string) *RawInode {
	t.Helper()
	n, err := img.Lookup(path)
	if err != nil {
		t.Fatal(err)
	}
	nid, _ := img.Nid(n)
	ri, err := img.Inode(nid)
	if err != nil {
		t.Fatal(err)
	}
	return ri
}

// rdDirTail returns the offset of an inline directory's dirents.
func rdDirTail(t *testing.T, ri *RawInode) int64 {
	t.Helper()
	if ri.Layout != rdLayoutInline {
		t.Fatalf("nid %d is not an inline directory", ri.Nid)
	}
	return ri.Offset + ri.Extent - int64(ri.Size%rdBlk)
}

func rdDirentIndex(t *testing.T, ri *RawInode, name string) int64 {
	t.Helper()
	for i, d := range ri.Dirents {
		if d.Name == name {
			return int64(i)
		}
	}
	t.Fatalf("no dirent %q", name)
	return 0
}

func TestReaderHostile(t *testing.T) {
	basic := readGolden(t, "basic.cfs")
	base := rdMustOpen(t, basic, OpenOptions{})
	root := rdInodeOf(t, base, "/")
	dir := rdInodeOf(t, base, "/dir")
	inline := rdInodeOf(t, base, "/inline")
	ext := rdInodeOf(t, base, "/dir/ext-4095")
	extDigest := ext.Metacopy
	hwData := readGolden(t, "hardlink-whiteout.cfs")
	hw := rdMustOpen(t, hwData, OpenOptions{})
	copyData := rdInodeOf(t, hw, "/dir/copy-of-data")

	tests := []struct {
		name   string
		data   []byte
		mutate func(b []byte) []byte
		opts   OpenOptions
		want   error
		msg    string // substring of the error
	}{
		{name: "empty", mutate: func(b []byte) []byte { return nil }, want: ErrCorrupt},
		{name: "truncated header", mutate: func(b []byte) []byte { return b[:100] }, want: ErrCorrupt},
		{name: "truncated superblock", mutate: func(b []byte) []byte { return b[:1100] }, want: ErrCorrupt},
		{name: "truncated one block", mutate: func(b []byte) []byte { return b[:4096] }, want: ErrCorrupt, msg: "truncated"},
		{name: "truncated last block", mutate: func(b []byte) []byte { return b[:len(b)-4096] }, want: ErrCorrupt, msg: "truncated"},
		{name: "truncated odd", mutate: func(b []byte) []byte { return b[:len(b)-1] }, want: ErrCorrupt},
		{name: "bad magic", mutate: func(b []byte) []byte { b[0] ^= 1; return b }, want: ErrCorrupt, msg: "magic"},
		{name: "bad header version", mutate: func(b []byte) []byte { rdLe32(b, 4, 2); return b }, want: ErrUnsupported},
		{name: "composefs version 2", mutate: func(b []byte) []byte { rdLe32(b, 12, 2); return b }, want: ErrUnsupported, msg: "composefs_version 2"},
		{name: "unknown flags", mutate: func(b []byte) []byte { rdLe32(b, 8, 6); return b }, want: ErrUnsupported},
		{name: "bad erofs magic", mutate: func(b []byte) []byte { b[1024] ^= 0xff; return b }, want: ErrCorrupt, msg: "EROFS magic"},
		{name: "block size", mutate: func(b []byte) []byte { b[1036] = 13; return b }, want: ErrUnsupported},
		{name: "root nid zero", mutate: func(b []byte) []byte { rdLe16(b, 1038, 0); return b }, want: ErrCorrupt, msg: "root nid"},
		{name: "root nid beyond end", mutate: func(b []byte) []byte { rdLe16(b, 1038, 0xffff); return b }, want: ErrCorrupt, msg: "root nid"},
		{name: "root not a dir", mutate: func(b []byte) []byte { rdLe16(b, 1038, uint16(inline.Nid)); return b }, want: ErrCorrupt, msg: "not a directory"},
		{name: "huge block count", mutate: func(b []byte) []byte { rdLe32(b, 1060, 0xffffffff); return b }, want: ErrCorrupt, msg: "truncated"},
		{name: "huge inode count", mutate: func(b []byte) []byte { rdLe64(b, 1040, 1<<60); return b }, want: ErrCorrupt},
		{name: "xattr blkaddr beyond end", mutate: func(b []byte) []byte { rdLe32(b, 1068, 1000); return b }, want: ErrCorrupt},
		{name: "incompat feature", mutate: func(b []byte) []byte { rdLe32(b, 1104, 0x10); return b }, want: ErrUnsupported},
		{name: "root blocks beyond end", mutate: func(b []byte) []byte { rdLe32(b, root.Offset+16, 1000); return b }, want: ErrCorrupt, msg: "data blocks"},
		{name: "root blocks at 0", mutate: func(b []byte) []byte { rdLe32(b, root.Offset+16, 0); return b }, want: ErrCorrupt},
		{name: "huge dir size", mutate: func(b []byte) []byte { rdLe32(b, root.Offset+8, 0xfffffff0); return b }, want: ErrCorrupt, msg: "directory size"},
		{name: "huge inline file size", mutate: func(b []byte) []byte { rdLe32(b, inline.Offset+8, 0xffffffff); return b }, want: ErrCorrupt, msg: "inline file"},
		{name: "huge xattr count", mutate: func(b []byte) []byte { rdLe16(b, root.Offset+2, 0xffff); return b }, want: ErrCorrupt},
		{name: "compressed layout", mutate: func(b []byte) []byte { rdLe16(b, inline.Offset, 1<<1); return b }, want: ErrUnsupported, msg: "layout"},
		{name: "bad file type", mutate: func(b []byte) []byte { rdLe16(b, inline.Offset+4, 0o170644); return b }, want: ErrCorrupt, msg: "file type"},
		{name: "dirent type mismatch", mutate: func(b []byte) []byte {
			b[rdDirTail(t, dir)+12*rdDirentIndex(t, dir, "fifo")+10] = 1
			return b
		}, want: ErrCorrupt, msg: "/dir/fifo"},
		{name: "loop: entry points at its parent", mutate: func(b []byte) []byte {
			off := rdDirTail(t, dir) + 12*rdDirentIndex(t, dir, "fifo")
			rdLe64(b, off, root.Nid)
			b[off+10] = 2
			return b
		}, want: ErrCorrupt, msg: "reachable twice"},
		{name: "loop: entry points at itself", mutate: func(b []byte) []byte {
			off := rdDirTail(t, dir) + 12*rdDirentIndex(t, dir, "fifo")
			rdLe64(b, off, dir.Nid)
			b[off+10] = 2
			return b
		}, want: ErrCorrupt, msg: "reachable twice"},
		{name: "dotdot not the parent", mutate: func(b []byte) []byte {
			rdLe64(b, rdDirTail(t, dir)+12*rdDirentIndex(t, dir, ".."), dir.Nid)
			return b
		}, want: ErrCorrupt, msg: `".."`},
		{name: "dirent nid out of range", mutate: func(b []byte) []byte {
			rdLe64(b, rdDirTail(t, dir)+12*rdDirentIndex(t, dir, "fifo"), 1<<40)
			return b
		}, want: ErrCorrupt, msg: "out of range"},
		{name: "dirent nid inside the superblock", mutate: func(b []byte) []byte {
			rdLe64(b, rdDirTail(t, dir)+12*rdDirentIndex(t, dir, "fifo"), 33)
			return b
		}, want: ErrCorrupt, msg: "out of range"},
		{name: "bad first nameoff", mutate: func(b []byte) []byte {
			rdLe16(b, rdDirTail(t, dir)+8, 13)
			return b
		}, want: ErrCorrupt, msg: "nameoff"},
		{name: "nameoff beyond chunk", mutate: func(b []byte) []byte {
			rdLe16(b, rdDirTail(t, dir)+12*rdDirentIndex(t, dir, "fifo")+8, 4000)
			return b
		}, want: ErrCorrupt},
		{name: "duplicate names", mutate: func(b []byte) []byte {
			i := bytes.Index(b, []byte("ext-4097"))
			copy(b[i:], "ext-4095")
			return b
		}, want: ErrCorrupt, msg: "duplicate"},
		{name: "name with slash", mutate: func(b []byte) []byte {
			i := bytes.Index(b, []byte("ext-4097"))
			b[i+3] = '/'
			return b
		}, want: ErrCorrupt, msg: "'/'"},
		{name: "bad redirect", mutate: func(b []byte) []byte {
			i := bytes.Index(b, []byte("/5f/4953aad6"))
			b[i+5] = 'G'
			return b
		}, want: ErrForeignRedirect, msg: "/dir/ext-4095"},
		{name: "redirect names another object", mutate: func(b []byte) []byte {
			i := bytes.Index(b, []byte("/5f/4953aad6"))
			b[i+5] = '5'
			return b
		}, want: ErrDigestMismatch, msg: "/dir/ext-4095"},
		{name: "mismatched metacopy", mutate: func(b []byte) []byte {
			i := bytes.Index(b, extDigest[:])
			b[i] ^= 1
			return b
		}, want: ErrDigestMismatch},
		{name: "mismatched metacopy accepted when rdLenient", mutate: func(b []byte) []byte {
			i := bytes.Index(b, extDigest[:])
			b[i] ^= 1
			return b
		}, opts: rdLenient},
		{name: "metacopy header", mutate: func(b []byte) []byte {
			i := bytes.Index(b, extDigest[:])
			b[i-1] = 2
			return b
		}, want: ErrCorrupt, msg: "metacopy header"},
		{name: "chunk not a hole", mutate: func(b []byte) []byte {
			rdLe32(b, ext.Offset+ext.Extent-4, 7)
			return b
		}, want: ErrCorrupt, msg: "hole"},
		{name: "chunk format with indexes", mutate: func(b []byte) []byte {
			rdLe32(b, ext.Offset+16, 0x20)
			return b
		}, want: ErrUnsupported},
		{name: "chunk format high bits", mutate: func(b []byte) []byte {
			rdLe32(b, ext.Offset+16, 0x10000)
			return b
		}, want: ErrUnsupported, msg: "chunk format"},
		{name: "chunk format high bits accepted with AllowUnreadableFiles", mutate: func(b []byte) []byte {
			rdLe32(b, ext.Offset+16, 0x10000)
			return b
		}, opts: OpenOptions{AllowUnreadableFiles: true}},
		{name: "chunk map crossing a block", mutate: func(b []byte) []byte {
			rdLe32(b, ext.Offset+8, 1024*4096) // 1024 chunks of 4 KiB: 4096 bytes of map
			return b
		}, want: ErrUnsupported, msg: "does not fit beside its inode"},
		{name: "chunk map crossing a block accepted with AllowUnreadableFiles", mutate: func(b []byte) []byte {
			rdLe32(b, ext.Offset+8, 1024*4096)
			return b
		}, opts: OpenOptions{AllowUnreadableFiles: true}},
		{name: "too many chunks", mutate: func(b []byte) []byte {
			rdLe32(b, ext.Offset+8, 0xffffffff) // 4 GiB in 4 KiB chunks
			return b
		}, want: ErrCorrupt, msg: "chunks"},
		{name: "shared xattr id out of range", data: hwData, mutate: func(b []byte) []byte {
			isize := int64(rdCompactSize)
			if copyData.Extended {
				isize = rdExtendedSize
			}
			if b[copyData.Offset+isize+4] == 0 {
				t.Fatal("copy-of-data has no shared xattrs")
			}
			rdLe32(b, copyData.Offset+isize+12, 0xfffffff)
			return b
		}, want: ErrCorrupt, msg: "shared xattr"},
		{name: "negative MaxDepth means the default", mutate: func(b []byte) []byte { return b }, opts: OpenOptions{MaxDepth: -1}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := tc.data
			if src == nil {
				src = basic
			}
			b := tc.mutate(bytes.Clone(src))
			img, err := rdOpenBytes(b, tc.opts)
			rdCheckDumpImage(t, b, tc.opts, img, err)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				if err := WriteDump(new(bytes.Buffer), img.Root()); err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Open = %v, want %v", err, tc.want)
			}
			if tc.msg != "" && !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q does not mention %q", err, tc.msg)
			}
		})
	}
}

func TestReaderMaxDepth(t *testing.T) {
	b := readGolden(t, "longnames-bigdir.cfs")
	if _, err := rdOpenBytes(b, OpenOptions{MaxDepth: 1}); err != nil {
		t.Fatalf("depth 1: %v", err)
	}
	// basic has /dir at depth 1; realdir has /subdir/deeper at depth 2.
	r := readGolden(t, "realdir.cfs")
	if _, err := rdOpenBytes(r, OpenOptions{MaxDepth: 1}); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("depth 1 on realdir: %v", err)
	}
	if _, err := rdOpenBytes(r, OpenOptions{MaxDepth: 2}); err != nil {
		t.Fatalf("depth 2 on realdir: %v", err)
	}
}

// Every truncation and every single-byte corruption of the metadata of a
// golden image either opens or fails with a sentinel error.
func TestReaderNeverPanics(t *testing.T) {
	data := readGolden(t, "hardlink-whiteout.cfs")
	for n := 0; n < len(data); n += 97 {
		if _, err := rdOpenBytes(data[:n], rdLenient); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("truncated to %d: %v", n, err)
		}
	}
	b := bytes.Clone(data)
	// The header, superblock, inode table and shared xattrs: the first
	// data block is the root directory.
	limit := int(rdInodeOf(t, rdMustOpen(t, data, rdLenient), "/").U) * rdBlk
	// Every byte of the header and superblock, then a sample of the inode
	// table (FuzzOpenImage explores the rest).
	step := func(i int) int {
		if i < rdInodeStart {
			return 1
		}
		return 7
	}
	for i := 0; i < limit; i += step(i) {
		for _, v := range []byte{0, 0xff, b[i] ^ 0x80} {
			old := b[i]
			b[i] = v
			img, err := rdOpenBytes(b, rdLenient)
			b[i] = old
			if err != nil {
				if !rdIsReaderError(err) {
					t.Fatalf("byte %d = %#x: unexpected error %v", i, v, err)
				}
				continue
			}
			if err := WriteDump(new(bytes.Buffer), img.Root()); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func rdIsReaderError(err error) bool {
	for _, e := range []error{ErrCorrupt, ErrUnsupported, ErrForeignRedirect, ErrDigestMismatch, ErrTooLarge} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func TestWriteDumpEscaping(t *testing.T) {
	d := Digest{1, 2, 3}
	root := &Node{Mode: ModeDir | 0o755, Nlink: 2}
	f := &Node{Name: "a b\\\n=", Mode: ModeRegular | 0o644, Nlink: 2, Size: 1, Content: []byte("-"),
		Xattrs: []Xattr{{Key: "user.k=v", Value: []byte("-\x00 =")}}, Mtime: Timespec{Sec: -1, Nsec: 5}}
	g := &Node{Name: "-", Mode: ModeSymlink | 0o777, Payload: "-", Size: 1}
	e := &Node{Name: "e", Mode: ModeRegular | 0o600, Size: 9, Payload: "ab/cd", Digest: &d, Rdev: 0}
	l := &Node{Name: "z", LinkTo: f}
	for _, c := range []*Node{l, e, g, f} { // AddChild sorts
		if err := root.AddChild(c); err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if err := WriteDump(&buf, root); err != nil {
		t.Fatal(err)
	}
	want := "/ 0 40755 2 0 0 0 0.0 - - -\n" +
		"/- 1 120777 0 0 0 0 0.0 \\x2d - -\n" +
		"/a\\x20b\\\\\\n= 1 100644 2 0 0 0 -1.5 - \\x2d - user.k\\x3dv=-\\x00\\x20\\x3d\n" +
		"/e 9 100600 0 0 0 0 0.0 ab/cd - " + d.String() + "\n" +
		"/z 1 @100644 2 0 0 0 -1.5 /a\\x20b\\\\\\n= \\x2d - user.k\\x3dv=-\\x00\\x20\\x3d\n"
	if buf.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", buf.String(), want)
	}
	buf.Reset()
	if err := WriteList(&buf, root, ""); err != nil {
		t.Fatal(err)
	}
	wantLs := "/-\t-> -\n/a b\\\\\\n=\n/e\t@ ab/cd\n/z\n"
	if buf.String() != wantLs {
		t.Errorf("ls got:\n%q\nwant:\n%q", buf.String(), wantLs)
	}
}

// MaxInodes bounds both the inode count the superblock claims and the count
// the walk finds (a superblock may understate it).
func TestReaderMaxInodes(t *testing.T) {
	b := readGolden(t, "realdir.cfs")
	img := rdMustOpen(t, b, OpenOptions{})
	st := img.Stats()
	if st.SuperblockInodes <= st.Inodes || st.Inodes < 2 {
		t.Fatalf("unexpected stats %+v", st)
	}
	if _, err := rdOpenBytes(b, OpenOptions{MaxInodes: int(st.SuperblockInodes)}); err != nil {
		t.Fatalf("at the limit: %v", err)
	}
	_, err := rdOpenBytes(b, OpenOptions{MaxInodes: int(st.SuperblockInodes) - 1})
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("superblock over the limit: %v", err)
	}
	// A superblock understating the count: the walk still stops.
	lie := append([]byte(nil), b...)
	binary.LittleEndian.PutUint64(lie[1024+16:], 1)
	if _, err := rdOpenBytes(lie, OpenOptions{MaxInodes: int(st.Inodes)}); err != nil {
		t.Fatalf("understated superblock, walk at the limit: %v", err)
	}
	_, err = rdOpenBytes(lie, OpenOptions{MaxInodes: int(st.Inodes) - 1})
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("walk over the limit: %v", err)
	}
}

// TestStrictRefusesExternalFileWithoutRedirect: such a file reads EIO on a
// data-only overlay, so a strict open must not report "no objects needed".
func TestStrictRefusesExternalFileWithoutRedirect(t *testing.T) {
	d := VerityDigestOf(pattern(5000, 251))
	root := &Node{Mode: ModeDir | 0o755}
	if err := root.AddChild(&Node{Name: "x", Mode: ModeRegular | 0o644, Nlink: 1, Size: 5000, Digest: &d}); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := WriteImage(&buf, root, DefaultWriteOptions()); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()), OpenOptions{}); !errors.Is(err, ErrForeignRedirect) {
		t.Fatalf("strict open: %v, want ErrForeignRedirect", err)
	}
	img, err := Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()), OpenOptions{AllowForeignRedirects: true})
	if err != nil || len(img.Objects()) != 0 {
		t.Fatalf("lenient open: %v", err)
	}
}

// TestReaderChunkMapBeyondInode: an image with a file whose chunk map does
// not fit beside its inode (as mkcomposefs writes files over ~8.7 PB) is
// refused by default, naming why, and read as composefs-info reads it with
// AllowUnreadableFiles.
func TestReaderChunkMapBeyondInode(t *testing.T) {
	const dump = "/ 4096 40755 2 0 0 0 0.0 - - -\n/bigfile 9001899274941000 100777 1 0 0 0 0.0 - - - user.foo=\n"
	tree, err := ParseDump(strings.NewReader(dump), DumpOptions{Strict: true})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := WriteImage(&buf, tree, DefaultWriteOptions()); err != nil {
		t.Fatal(err)
	}
	_, err = rdOpenBytes(buf.Bytes(), rdLenient)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "/bigfile") || !strings.Contains(err.Error(), "chunk map does not fit") {
		t.Fatalf("Open without AllowUnreadableFiles = %v, want ErrUnsupported naming /bigfile and its chunk map", err)
	}
	img, err := rdOpenBytes(buf.Bytes(), OpenOptions{AllowForeignRedirects: true, AllowUnreadableFiles: true})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := WriteDump(&out, img.Root()); err != nil {
		t.Fatal(err)
	}
	if out.String() != dump {
		t.Errorf("dump:\n%s\nwant:\n%s", out.String(), dump)
	}
}

// rdCheckDumpImage checks that DumpImage accepts and refuses what Open
// does (img, err: Open's result), with the same error, writing nothing when
// it refuses, and otherwise writes what WriteDump writes of the tree.
func rdCheckDumpImage(t testing.TB, b []byte, opts OpenOptions, img *Image, err error) {
	t.Helper()
	var got bytes.Buffer
	derr := DumpImage(&got, bytes.NewReader(b), int64(len(b)), opts)
	if err != nil {
		if derr == nil || derr.Error() != err.Error() {
			t.Fatalf("Open: %v; DumpImage: %v", err, derr)
		}
		if got.Len() != 0 {
			t.Fatalf("DumpImage wrote %d bytes and refused the image: %v", got.Len(), derr)
		}
		return
	}
	if derr != nil {
		t.Fatalf("Open accepted the image, DumpImage: %v", derr)
	}
	var want bytes.Buffer
	if err := WriteDump(&want, img.Root()); err != nil {
		t.Fatal(err)
	}
	if got.String() != want.String() {
		t.Fatalf("DumpImage differs from WriteDump of the tree:\n%s", rdFirstLineDiff(got.String(), want.String()))
	}
}

// TestDumpImageGolden: DumpImage of every golden image, in both redirect
// policies, writes what WriteDump writes of Open's tree.
func TestDumpImageGolden(t *testing.T) {
	for _, name := range rdGoldenImageNames(t) {
		data := readGolden(t, name+".cfs")
		for _, opts := range []OpenOptions{rdLenient, {}} {
			img, err := rdOpenBytes(data, opts)
			rdCheckDumpImage(t, data, opts, img, err)
		}
	}
}

package localcluster

import (
	"archive/tar"
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
)

func TestArgvNames(t *testing.T) {
	const w = "/var/tmp/e2e"
	for _, tc := range []struct {
		argv []string
		want bool
	}{
		{[]string{"etcd", "--data-dir=/var/tmp/e2e/data/etcd"}, true},
		{[]string{"containerd", "--config", "/var/tmp/e2e/etc/containerd.toml"}, true},
		{[]string{"kubelet", "--root-dir=/var/tmp/e2e"}, true},
		{[]string{"etcd", "--data-dir=/var/tmp/e2e2/data"}, false}, // a sibling folder
		{[]string{"bash", "-c", "ls /var/tmp/e2e/x"}, false},       // named inside a longer argument
		{[]string{"etcd"}, false},
	} {
		if got := argvNames(tc.argv, w); got != tc.want {
			t.Errorf("argvNames(%q) = %v, want %v", tc.argv, got, tc.want)
		}
	}
}

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{
		`/a/b`:          "/a/b",
		`/a\040b`:       "/a b",
		`/x\011y\134z`:  "/x\ty\\z",
		`/trailing\04`:  `/trailing\04`,
		`/not\x41octal`: `/not\x41octal`,
	} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRelTo(t *testing.T) {
	for dir, want := range map[string]string{"bin": "../bin/busybox", "usr/bin": "../../bin/busybox", ".": "bin/busybox"} {
		if got, _ := relTo(dir, "bin/busybox"); got != want {
			t.Errorf("relTo(%q) = %q, want %q", dir, got, want)
		}
	}
}

func TestLayerTarIsReproducible(t *testing.T) {
	files := func() []fileEntry {
		return []fileEntry{{name: "z", data: []byte("z"), mode: 0o644}, {name: "a", dir: true, mode: 0o755},
			{name: "a/l", link: "../z", mode: 0o777}}
	}
	one, err := layerTar(files())
	if err != nil {
		t.Fatal(err)
	}
	fs := files()
	fs[0], fs[2] = fs[2], fs[0]
	two, _ := layerTar(fs)
	if !bytes.Equal(one, two) {
		t.Fatal("same files in another order give another layer")
	}
	tr := tar.NewReader(bytes.NewReader(one))
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Uid != 0 || h.Gid != 0 || h.ModTime.Unix() != 0 {
			t.Errorf("%s: owner %d:%d mtime %v, want 0:0 and 0", h.Name, h.Uid, h.Gid, h.ModTime)
		}
		names = append(names, h.Name)
	}
	if len(names) != 3 || names[0] != "a/" || names[1] != "a/l" || names[2] != "z" {
		t.Errorf("entries %q, want sorted a/, a/l, z", names)
	}
}

func TestRemoveEmptyTreeKeepsFiles(t *testing.T) {
	d := t.TempDir()
	for _, p := range []string{"a/b", "c"} {
		if err := os.MkdirAll(filepath.Join(d, "x", p), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	l, err := net.Listen("unix", filepath.Join(d, "x", "a", "b", "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if err := os.WriteFile(filepath.Join(d, "x", "c", "keep"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	removeEmptyTree(filepath.Join(d, "x"))
	if _, err := os.Stat(filepath.Join(d, "x", "a")); !os.IsNotExist(err) {
		t.Errorf("folder holding only a socket kept: %v", err)
	}
	if _, err := os.Stat(filepath.Join(d, "x", "c", "keep")); err != nil {
		t.Errorf("a regular file was removed: %v", err)
	}
}

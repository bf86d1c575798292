package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// disk is where every candidate writes what it downloads (the curl file,
// the untarred tree, the stores): a fresh journaled ext4 of the
// benchmark's own, on a loop device over a preallocated file (direct I/O,
// so the data is not cached twice), as on a node's disk. The filesystem
// the work directory is on may be unrepresentative of a node's: without a
// journal, ext4's inode allocator skips, one lookup at a time, every inode
// deleted in the last seconds, which makes creating thousands of files
// right after removing thousands (each round does) quadratic in CPU.
type disk struct {
	img, dir, dev string
}

func newDisk(root string, sizeGiB int) (*disk, error) {
	d := &disk{img: filepath.Join(root, "disk.img"), dir: filepath.Join(root, "out")}
	os.Remove(d.img)
	if err := run("fallocate", "-l", fmt.Sprintf("%dG", sizeGiB), d.img); err != nil {
		return nil, err
	}
	if err := run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", d.img); err != nil {
		d.remove()
		return nil, err
	}
	out, err := output("losetup", "--find", "--show", "--direct-io=on", d.img)
	if err != nil {
		d.remove()
		return nil, err
	}
	d.dev = strings.TrimSpace(out)
	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		d.remove()
		return nil, err
	}
	if err := run("mount", "-t", "ext4", d.dev, d.dir); err != nil {
		d.remove()
		return nil, err
	}
	return d, nil
}

// remove unmounts the filesystem, detaches the loop device and deletes
// the image.
func (d *disk) remove() {
	if d == nil {
		return
	}
	_ = run("umount", d.dir)
	if d.dev != "" {
		_ = run("losetup", "-d", d.dev)
	}
	os.Remove(d.img)
}

package cfs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// MountSourcePrefix is the overlay source of every composefs mount this
// package makes: "composefs", or "composefs:<image digest>" when the digest
// is known. It is how a restarted driver finds its mounts in mountinfo.
const MountSourcePrefix = "composefs"

// MountInfo is one line of /proc/self/mountinfo.
type MountInfo struct {
	ID         int
	ParentID   int
	Dev        string // "major:minor"
	Root       string
	MountPoint string
	Options    string   // per-mount options ("ro,nodev,nosuid,relatime")
	Optional   []string // optional fields ("shared:12")
	FSType     string
	Source     string
	SuperOpts  string // per-superblock options, as the kernel prints them (octal escapes kept)
}

// IsComposefs reports whether m is a composefs overlay: an overlay whose
// source is "composefs" or "composefs:<digest>".
func (m MountInfo) IsComposefs() bool {
	return m.FSType == "overlay" &&
		(m.Source == MountSourcePrefix || strings.HasPrefix(m.Source, MountSourcePrefix+":"))
}

// ImageDigest returns the image digest recorded in the source of a
// composefs mount, when there is one.
func (m MountInfo) ImageDigest() (Digest, bool) {
	if !m.IsComposefs() {
		return Digest{}, false
	}
	s, ok := strings.CutPrefix(m.Source, MountSourcePrefix+":")
	if !ok {
		return Digest{}, false
	}
	d, err := ParseDigest(s)
	return d, err == nil
}

// HasOption reports whether the comma-separated per-mount or per-superblock
// options contain opt exactly ("nodev", "verity=require").
func (m MountInfo) HasOption(opt string) bool {
	for _, list := range []string{m.Options, m.SuperOpts} {
		for _, o := range splitMountOptions(list) {
			if o == opt {
				return true
			}
		}
	}
	return false
}

// Verity returns the verity mode the kernel enforces on this overlay:
// VerityRequire when it was mounted with verity=require or verity=on, else
// "" (the mount itself does not tell userspace checking from none).
func (m MountInfo) Verity() VerityMode {
	if m.HasOption("verity=require") || m.HasOption("verity=on") {
		return VerityRequire
	}
	return ""
}

// splitMountOptions splits a mountinfo option list on commas, then undoes
// each option's octal escapes: the kernel prints a comma inside a path as
// \054, so splitting first keeps such a path one option.
func splitMountOptions(s string) []string {
	if s == "" {
		return nil
	}
	out := strings.Split(s, ",")
	for i := range out {
		out[i] = unescapeMountInfo(out[i])
	}
	return out
}

// ParseMountInfo parses the format of /proc/PID/mountinfo.
func ParseMountInfo(r io.Reader) ([]MountInfo, error) {
	var out []MountInfo
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		text := sc.Text()
		if strings.TrimSpace(text) == "" {
			continue
		}
		m, err := parseMountInfoLine(text)
		if err != nil {
			return nil, fmt.Errorf("mountinfo line %d: %w", line, err)
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading mountinfo: %w", err)
	}
	return out, nil
}

func parseMountInfoLine(s string) (MountInfo, error) {
	f := strings.Split(s, " ")
	sep := -1
	for i := 6; i < len(f); i++ {
		if f[i] == "-" {
			sep = i
			break
		}
	}
	if len(f) < 7 || sep < 0 || len(f) < sep+3 {
		return MountInfo{}, fmt.Errorf("malformed line %q", truncateForError(s))
	}
	var m MountInfo
	var err error
	if m.ID, err = strconv.Atoi(f[0]); err != nil {
		return MountInfo{}, fmt.Errorf("mount id %q: %w", f[0], err)
	}
	if m.ParentID, err = strconv.Atoi(f[1]); err != nil {
		return MountInfo{}, fmt.Errorf("parent id %q: %w", f[1], err)
	}
	m.Dev = f[2]
	m.Root = unescapeMountInfo(f[3])
	m.MountPoint = unescapeMountInfo(f[4])
	m.Options = f[5]
	if sep > 6 {
		m.Optional = append([]string(nil), f[6:sep]...)
	}
	m.FSType = unescapeMountInfo(f[sep+1])
	m.Source = unescapeMountInfo(f[sep+2])
	if len(f) > sep+3 {
		m.SuperOpts = strings.Join(f[sep+3:], " ")
	}
	return m, nil
}

// unescapeMountInfo undoes the kernel's octal escapes (\040 for a space,
// \011, \012, \134 for a backslash).
func unescapeMountInfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// ReadMountInfo returns the mounts of this process's mount namespace.
func ReadMountInfo() ([]MountInfo, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("reading mount table: %w", err)
	}
	return ParseMountInfo(bytes.NewReader(data))
}

// ComposefsMounts lists every composefs overlay of this mount namespace,
// so that a restarted driver can find the volumes it mounted.
func ComposefsMounts() ([]MountInfo, error) {
	all, err := ReadMountInfo()
	if err != nil {
		return nil, err
	}
	var out []MountInfo
	for _, m := range all {
		if m.IsComposefs() {
			out = append(out, m)
		}
	}
	return out, nil
}

// IsMounted reports whether something is mounted on target, and returns the
// topmost mount there (check MountInfo.IsComposefs to tell a composefs
// overlay from other mounts). An absent target is not mounted; that is not
// an error.
func IsMounted(target string) (MountInfo, bool, error) {
	path, err := resolveTarget(target)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, errSymlinkTarget) {
			return MountInfo{}, false, nil
		}
		return MountInfo{}, false, fmt.Errorf("checking mount at %s: %w", target, err)
	}
	all, err := ReadMountInfo()
	if err != nil {
		return MountInfo{}, false, fmt.Errorf("checking mount at %s: %w", target, err)
	}
	return topMountAt(all, path)
}

// topMountAt picks the last-mounted entry at path: children come after
// their parents in mountinfo, and a mount over a mount has the lower as its
// parent, so the entry no other entry at path names as parent is on top.
func topMountAt(all []MountInfo, path string) (MountInfo, bool, error) {
	var at []MountInfo
	for _, m := range all {
		if m.MountPoint == path {
			at = append(at, m)
		}
	}
	if len(at) == 0 {
		return MountInfo{}, false, nil
	}
	for _, m := range at {
		covered := false
		for _, o := range at {
			if o.ParentID == m.ID {
				covered = true
				break
			}
		}
		if !covered {
			return m, true, nil
		}
	}
	return at[len(at)-1], true, nil
}

// resolveTarget makes target absolute and resolves symlinks in its parent
// directories, as the kernel shows mount points. A target that is itself a
// symlink is errSymlinkTarget: Mount and Unmount act on the link, not on
// what it points to, so nothing is mounted "at" it.
func resolveTarget(target string) (string, error) {
	abs, err := filepath.Abs(target)
	if err != nil {
		return "", err
	}
	if abs == "/" {
		return abs, nil
	}
	dir, err := filepath.EvalSymlinks(filepath.Dir(abs))
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, filepath.Base(abs))
	fi, err := os.Lstat(p)
	if err != nil {
		return "", err
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		return "", errSymlinkTarget
	}
	return p, nil
}

var errSymlinkTarget = errors.New("target is a symlink")

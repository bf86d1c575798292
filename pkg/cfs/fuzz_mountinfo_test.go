package cfs

import (
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"
)

// mangleMountInfo escapes s as the kernel prints a path in mountinfo
// (seq_path with " \t\n\\"): those four bytes as \ooo, all others as is.
func mangleMountInfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case ' ', '\t', '\n', '\\':
			fmt.Fprintf(&b, "\\%03o", c)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// formatMountInfo writes m back as a mountinfo line.
func formatMountInfo(m MountInfo) string {
	fields := []string{fmt.Sprint(m.ID), fmt.Sprint(m.ParentID), m.Dev, mangleMountInfo(m.Root), mangleMountInfo(m.MountPoint), m.Options}
	fields = append(fields, m.Optional...)
	fields = append(fields, "-", mangleMountInfo(m.FSType), mangleMountInfo(m.Source))
	if m.SuperOpts != "" {
		fields = append(fields, m.SuperOpts)
	}
	return strings.Join(fields, " ")
}

// FuzzParseMountInfo feeds arbitrary text to the mountinfo parser (the
// driver trusts what it reads there to find its mounts, and paths in it
// come from users: a pod's volume path, an image's mount point). It must
// not panic; a line it accepts, printed back the way the kernel escapes
// it, parses to the same entry; the option helpers agree with each other;
// and a whole text parses to one entry per non-blank line. Seeds: the
// lines of the unit test and this machine's own mount table.
func FuzzParseMountInfo(f *testing.F) {
	for _, s := range []string{
		`22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw`,
		`45 22 0:40 / /var/lib/kubelet/pods/p\040q/volumes/x ro,nosuid,nodev,noexec,relatime shared:7 master:3 - overlay composefs:8f589e8f57ecb88823736b0d857ddca1e1068a23e264fad164b28f7038eb3682 ro,lowerdir+=/,datadir+=/srv/objects,redirect_dir=on,metacopy=on,verity=require`,
		`47 22 0:42 / /mnt/c ro - overlay composefs ro,lowerdir=/tmp/e::/o\134x`,
		`49 22 0:44 / /mnt/d ro - overlay composefs ro,lowerdir+=/e,datadir+=/obj\054verity=require\054x\134,redirect_dir=on`,
		`1 2 3 4 5 6 - - - -`,
		"1 2 3\n",
	} {
		f.Add(s)
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.SplitN(string(b), "\n", 50) {
			f.Add(l)
		}
	}
	f.Fuzz(func(t *testing.T, text string) {
		if len(text) > 1<<16 {
			return
		}
		if !strings.Contains(text, "\n") {
			m, err := parseMountInfoLine(text)
			if err != nil {
				if !reflect.DeepEqual(m, MountInfo{}) {
					t.Fatalf("error %v with an entry %+v", err, m)
				}
				return
			}
			line := formatMountInfo(m)
			again, err := parseMountInfoLine(line)
			if err != nil {
				t.Fatalf("%q parsed to %+v, printed back as %q, which fails: %v", text, m, line, err)
			}
			if !reflect.DeepEqual(again, m) {
				t.Fatalf("%q parsed to %+v; printed back as %q it parses to %+v", text, m, line, again)
			}
			for _, field := range []string{m.Root, m.MountPoint, m.FSType, m.Source} {
				if len(field) > len(text) {
					t.Fatalf("unescaping made %q longer than the line", field)
				}
			}
			if m.Verity() == VerityRequire && !m.HasOption("verity=require") && !m.HasOption("verity=on") {
				t.Fatalf("Verity says require without the option: %+v", m)
			}
			for _, o := range splitMountOptions(m.SuperOpts) {
				if !m.HasOption(o) {
					t.Fatalf("option %q of %q not found by HasOption", o, m.SuperOpts)
				}
			}
			if d, ok := m.ImageDigest(); ok && (!m.IsComposefs() || !strings.EqualFold(m.Source, MountSourcePrefix+":"+d.String())) {
				t.Fatalf("digest %s from source %q (composefs %v)", d, m.Source, m.IsComposefs())
			}
			return
		}
		ms, err := ParseMountInfo(strings.NewReader(text))
		if err != nil {
			return
		}
		lines := 0
		for _, l := range strings.Split(text, "\n") {
			if strings.TrimSpace(l) != "" {
				lines++
			}
		}
		if len(ms) != lines {
			t.Fatalf("%d entries from %d non-blank lines", len(ms), lines)
		}
	})
}

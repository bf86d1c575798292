package cfs

import (
	"bufio"
	"io"
	"sort"
)

// Escaping modes of composefs-info's output (§4).
const (
	dwNoEscapeSpace  = 1 << iota // a space stays literal (ls paths)
	dwEscapeEqual                // '=' becomes \x3d (xattr keys and values)
	dwEscapeLoneDash             // a value of exactly "-" becomes \x2d
)

// dwEscape writes s escaped as composefs-info prints it: \\ \n \r \t, other
// bytes outside 0x21..0x7e (0x20..0x7e with dwNoEscapeSpace) as \xhh.
func dwEscape[T string | []byte](w *bufio.Writer, s T, mode int) {
	if mode&dwEscapeLoneDash != 0 && len(s) == 1 && s[0] == '-' {
		w.WriteString(`\x2d`)
		return
	}
	const hexdig = "0123456789abcdef"
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\\':
			w.WriteString(`\\`)
		case c == '\n':
			w.WriteString(`\n`)
		case c == '\r':
			w.WriteString(`\r`)
		case c == '\t':
			w.WriteString(`\t`)
		case c == '=' && mode&dwEscapeEqual != 0,
			c == ' ' && mode&dwNoEscapeSpace == 0,
			c < 0x20 || c > 0x7e:
			w.Write([]byte{'\\', 'x', hexdig[c>>4], hexdig[c&0xf]})
		default:
			w.WriteByte(c)
		}
	}
}

// dwSortedChildren returns the children in strcmp order (the slice itself
// when it is sorted already, as trees built by AddChild and Open are).
func dwSortedChildren(n *Node) []*Node {
	c := n.Children
	if sort.SliceIsSorted(c, func(i, j int) bool { return c[i].Name < c[j].Name }) {
		return c
	}
	c = append([]*Node(nil), c...)
	sort.SliceStable(c, func(i, j int) bool { return c[i].Name < c[j].Name })
	return c
}

// WriteDump writes the tree under root as a composefs dumpfile, exactly as
// `composefs-info dump` prints it: one line per path in depth-first strcmp
// order, xattrs in slice order, hardlink aliases as "@MODE" with the
// primary's path as payload and the primary's other fields.
func WriteDump(w io.Writer, root *Node) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	path := make([]byte, 0, 256)
	var walk func(n *Node)
	walk = func(n *Node) {
		t := n.Target()
		if n.LinkTo != nil {
			dwNodeLine(bw, path, true, t, t.Path())
		} else {
			dwNodeLine(bw, path, false, t, "")
		}
		if !n.IsDir() {
			return
		}
		l := len(path)
		for _, c := range dwSortedChildren(n) {
			path = append(path[:l], '/')
			path = append(path, c.Name...)
			walk(c)
		}
		path = path[:l]
	}
	walk(root)
	return bw.Flush()
}

// dwNodeLine writes the dump line of node t at path; an alias line shows
// t's fields with targetPath, the path of t's first entry, as payload.
func dwNodeLine(bw *bufio.Writer, path []byte, alias bool, t *Node, targetPath string) {
	dwPath(bw, path)
	f := dwFields{size: t.Size, mode: t.Mode, nlink: t.Nlink, uid: t.UID, gid: t.GID, rdev: t.Rdev, mtime: t.Mtime}
	dwWriteFields(bw, &f, alias)
	if alias {
		dwOptional(bw, targetPath)
	} else {
		dwOptional(bw, t.Payload)
	}
	dwOptional(bw, t.Content)
	dwDigest(bw, t.Digest)
	for _, x := range t.Xattrs {
		bw.WriteByte(' ')
		dwEscape(bw, x.Key, dwEscapeEqual)
		bw.WriteByte('=')
		dwEscape(bw, x.Value, dwEscapeEqual)
	}
	bw.WriteByte('\n')
}

// WriteList lists the entries below dir as `composefs-info ls` does, one
// line per path in depth-first strcmp order: directories as "PATH/\t",
// symlinks as "PATH\t-> TARGET", regular files with a backing object as
// "PATH\t@ OBJECT", anything else (and hardlink aliases, as composefs-info
// does) as "PATH". base is the path of dir ("" for the root).
func WriteList(w io.Writer, dir *Node, base string) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	path := append(make([]byte, 0, 256), base...)
	var walk func(n *Node)
	walk = func(n *Node) {
		l := len(path)
		for _, c := range dwSortedChildren(n) {
			path = append(path[:l], '/')
			path = append(path, c.Name...)
			dwListLine(bw, c, path)
			if c.IsDir() {
				walk(c)
			}
		}
		path = path[:l]
	}
	if dir.IsDir() {
		walk(dir)
	} else {
		dwListLine(bw, dir, []byte(base))
	}
	return bw.Flush()
}

func dwListLine(bw *bufio.Writer, c *Node, path []byte) {
	dwEscape(bw, path, dwNoEscapeSpace)
	if c.LinkTo == nil {
		switch c.Type() {
		case ModeDir:
			bw.WriteString("/\t")
		case ModeSymlink:
			bw.WriteString("\t-> ")
			dwEscape(bw, c.Payload, 0)
		case ModeRegular:
			if c.Payload != "" {
				bw.WriteString("\t@ ")
				dwEscape(bw, c.Payload, 0)
			}
		}
	}
	bw.WriteByte('\n')
}

// dwOptional writes an optional field (PAYLOAD, CONTENT) and the space
// after it: escaped, "-" when empty.
func dwOptional[T string | []byte](bw *bufio.Writer, v T) {
	if len(v) > 0 {
		dwEscape(bw, v, dwEscapeLoneDash)
	} else {
		bw.WriteByte('-')
	}
	bw.WriteByte(' ')
}

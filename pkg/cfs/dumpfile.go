package cfs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// DumpOptions control dumpfile parsing.
type DumpOptions struct {
	// Strict is mkcomposefs's CFS_PARSE_STRICT: a trailing newline is
	// required, symlink sizes must match their target and carry no content,
	// and non-devices must have rdev 0. Strict parsing also refuses what
	// mkcomposefs accepts in either mode but this parser only accepts
	// without Strict: lines with fewer than the 11 fixed fields, mode bits
	// beyond the file type and permissions, and a malformed DIGEST on an
	// entry that does not use it.
	//
	// Without Strict (mkcomposefs's default), missing trailing fields
	// read as empty, as mkcomposefs reads them: an empty number or MTIME
	// is still an error, an empty PAYLOAD or CONTENT means none (CONTENT
	// must then agree with SIZE 0), and an empty DIGEST is ignored unless
	// the entry is an external regular file, which needs a valid one
	// (mkcomposefs would use uninitialised bytes). Mode bits above 0o177777
	// are dropped (the image stores 16 bits).
	Strict bool
}

// ParseStrictEnv is the environment variable that makes mkcomposefs parse
// dumpfiles strictly when it is set, whatever its value.
const ParseStrictEnv = "CFS_PARSE_STRICT"

// maxDumpLine bounds one dumpfile line. The largest valid line (a 4095-byte
// path and payload, 5000 bytes of content and 64 KiB of xattrs, all escaped
// four times over) is well below it.
const maxDumpLine = 1 << 20

// ErrDumpSyntax is wrapped by every dumpfile parse error.
var ErrDumpSyntax = errors.New("invalid dumpfile")

// ParseDump reads a composefs dumpfile (the format of `mkcomposefs
// --from-file` and `composefs-info dump`) into a tree. Errors name the line.
func ParseDump(r io.Reader, opts DumpOptions) (*Node, error) {
	p := dumpParser{opts: opts}
	br := bufio.NewReaderSize(r, 64*1024)
	var buf []byte
	for lineNo := 1; ; lineNo++ {
		line, err := readDumpLine(br, &buf)
		if err == io.EOF {
			break
		}
		if err != nil && !errors.Is(err, errNoNewline) {
			return nil, fmt.Errorf("dumpfile line %d: %w", lineNo, err)
		}
		if errors.Is(err, errNoNewline) && opts.Strict {
			return nil, fmt.Errorf("%w: line %d: missing trailing newline", ErrDumpSyntax, lineNo)
		}
		if perr := p.line(line); perr != nil {
			return nil, fmt.Errorf("%w: line %d: %v", ErrDumpSyntax, lineNo, perr)
		}
		if err != nil { // the last line had no newline
			break
		}
	}
	if p.root == nil {
		return nil, fmt.Errorf("%w: no root directory line", ErrDumpSyntax)
	}
	if err := p.resolveHardlinks(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrDumpSyntax, err)
	}
	return p.root, nil
}

var errNoNewline = errors.New("no trailing newline")

// readDumpLine returns the next line without its newline; errNoNewline with
// the line when the input ends without one; io.EOF at the end. The line is
// valid until the next call (it is the reader's buffer or buf).
func readDumpLine(br *bufio.Reader, buf *[]byte) ([]byte, error) {
	chunk, err := br.ReadSlice('\n')
	if err == nil {
		return chunk[:len(chunk)-1], nil // the whole line was buffered
	}
	line := append((*buf)[:0], chunk...)
	defer func() { *buf = line[:0] }()
	for {
		switch {
		case err == nil:
			return line[:len(line)-1], nil
		case err == bufio.ErrBufferFull:
		case err == io.EOF:
			if len(line) == 0 {
				return nil, io.EOF
			}
			return line, errNoNewline
		default:
			return nil, err
		}
		chunk, err = br.ReadSlice('\n')
		if len(line)+len(chunk) > maxDumpLine {
			return nil, fmt.Errorf("line longer than %d bytes", maxDumpLine)
		}
		line = append(line, chunk...)
	}
}

type dumpParser struct {
	opts      DumpOptions
	root      *Node
	hardlinks []hardlinkFixup
	// The parent directory of the last line, by the path up to its last
	// '/': lines come in depth-first order, so the next is often a sibling.
	lastDir     *Node
	lastDirPath string
	nodes       []Node // a slab the nodes are carved from
}

func (p *dumpParser) newNode() *Node {
	if len(p.nodes) == 0 {
		p.nodes = make([]Node, 256)
	}
	n := &p.nodes[0]
	p.nodes = p.nodes[1:]
	return n
}

type hardlinkFixup struct {
	node   *Node
	target string
}

const (
	fieldPath = iota
	fieldSize
	fieldMode
	fieldNlink
	fieldUID
	fieldGID
	fieldRdev
	fieldMtime
	fieldPayload
	fieldContent
	fieldDigest
	numFixedFields
)

var fieldNames = [numFixedFields]string{"PATH", "SIZE", "MODE", "NLINK", "UID", "GID", "RDEV", "MTIME", "PAYLOAD", "CONTENT", "DIGEST"}

func (p *dumpParser) line(line []byte) error {
	if i := bytes.IndexByte(line, 0); i >= 0 {
		return fmt.Errorf("NUL byte at position %d", i)
	}
	var f [numFixedFields][]byte
	rest := line
	got := numFixedFields
	for i := range f {
		var ok bool
		f[i], rest, ok = bytes.Cut(rest, []byte{' '})
		if !ok {
			got = i + 1
			rest = nil // the fields after this one stay empty
			break
		}
	}
	// Without Strict, a line may stop after MTIME, as mkcomposefs allows;
	// an entry needs at least its PATH..MTIME (a hardlink its PAYLOAD,
	// checked below) in either parser.
	if got < numFixedFields && (p.opts.Strict || got <= fieldMtime) {
		return fmt.Errorf("only %d of %d fields (missing %s)", got, numFixedFields, fieldNames[got])
	}
	pathBytes, err := unescapeDump(f[fieldPath])
	if err != nil {
		return fmt.Errorf("PATH: %v", err)
	}
	path := string(pathBytes)
	if path == "" {
		return errors.New("empty PATH")
	}

	modeField := f[fieldMode]
	hardlink := len(modeField) > 0 && modeField[0] == '@'
	if hardlink {
		modeField = modeField[1:]
	}
	bitSize := 32
	if !p.opts.Strict {
		bitSize = 64
	}
	mode, err := parseUint(modeField, 8, bitSize)
	if err != nil {
		return fmt.Errorf("%s: MODE: %v", path, err)
	}
	if !p.opts.Strict {
		mode &= 0o177777
	}
	if err := validateMode(uint32(mode)); err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	n := p.newNode()
	n.Mode = uint32(mode)
	if err := p.add(path, n); err != nil {
		return err
	}

	if hardlink {
		if n.Type() == ModeDir {
			return fmt.Errorf("%s: directories can't be hardlinked", path)
		}
		target, ok, err := unescapeOptional(f[fieldPayload])
		if err != nil {
			return fmt.Errorf("%s: PAYLOAD: %v", path, err)
		}
		if !ok || len(target) == 0 {
			return fmt.Errorf("%s: hardlink without a target path", path)
		}
		p.hardlinks = append(p.hardlinks, hardlinkFixup{node: n, target: string(target)})
		return nil
	}

	var nums [fieldRdev + 1]uint64
	for _, i := range []int{fieldSize, fieldNlink, fieldUID, fieldGID, fieldRdev} {
		bitSize := 64
		if i == fieldNlink || i == fieldUID || i == fieldGID {
			bitSize = 32
		}
		if nums[i], err = parseUint(f[i], 10, bitSize); err != nil {
			return fmt.Errorf("%s: %s: %v", path, fieldNames[i], err)
		}
	}
	n.Size, n.Nlink, n.UID, n.GID = nums[fieldSize], uint32(nums[fieldNlink]), uint32(nums[fieldUID]), uint32(nums[fieldGID])
	switch n.Type() {
	case ModeChar, ModeBlock:
		n.Rdev = nums[fieldRdev]
	default:
		if p.opts.Strict && nums[fieldRdev] != 0 {
			return fmt.Errorf("%s: non-zero RDEV on a non-device", path)
		}
	}
	if n.Mtime, err = parseMtime(f[fieldMtime]); err != nil {
		return fmt.Errorf("%s: MTIME: %v", path, err)
	}

	payload, hasPayload, err := unescapeOptional(f[fieldPayload])
	if err != nil {
		return fmt.Errorf("%s: PAYLOAD: %v", path, err)
	}
	if len(payload) > MaxSymlinkLen {
		return fmt.Errorf("%s: PAYLOAD is %d bytes, longer than %d", path, len(payload), MaxSymlinkLen)
	}
	if bytes.IndexByte(payload, 0) >= 0 {
		return fmt.Errorf("%s: PAYLOAD contains NUL", path)
	}
	content, hasContent, err := unescapeOptional(f[fieldContent])
	if err != nil {
		return fmt.Errorf("%s: CONTENT: %v", path, err)
	}
	if hasContent && uint64(len(content)) != n.Size {
		return fmt.Errorf("%s: CONTENT is %d bytes but SIZE is %d", path, len(content), n.Size)
	}
	digest, hasDigest, err := unescapeOptional(f[fieldDigest])
	if err != nil {
		return fmt.Errorf("%s: DIGEST: %v", path, err)
	}

	switch n.Type() {
	case ModeSymlink:
		if !hasPayload || len(payload) == 0 {
			return fmt.Errorf("%s: symlink without a target", path)
		}
		if p.opts.Strict && n.Size != uint64(len(payload)) {
			return fmt.Errorf("%s: symlink SIZE %d does not match its %d-byte target", path, n.Size, len(payload))
		}
		if p.opts.Strict && len(content) > 0 {
			return fmt.Errorf("%s: a symlink cannot have CONTENT", path)
		}
		n.Payload = string(payload)
		n.Size = uint64(len(payload))
	default:
		n.Payload = string(payload)
		if len(content) > MaxInlineContent {
			return fmt.Errorf("%s: CONTENT is %d bytes, more than the %d allowed inline", path, len(content), MaxInlineContent)
		}
		if len(content) > 0 && n.Type() == ModeRegular {
			n.Content = content
		}
	}
	if hasDigest {
		d, err := ParseDigest(string(digest))
		switch {
		case err == nil:
			n.Digest = &d
		case p.opts.Strict || (n.Type() == ModeRegular && n.Size > 0 && n.Content == nil):
			return fmt.Errorf("%s: DIGEST: %v", path, err)
		}
	}

	if len(rest) > MaxXattrValueLen {
		return fmt.Errorf("%s: xattrs take %d bytes, more than %d", path, len(rest), MaxXattrValueLen)
	}
	for len(rest) > 0 {
		var x []byte
		x, rest, _ = bytes.Cut(rest, []byte{' '})
		k, v, ok := bytes.Cut(x, []byte{'='})
		if !ok {
			return fmt.Errorf("%s: xattr %q has no '='", path, truncateForError(string(x)))
		}
		key, err := unescapeDump(k)
		if err != nil {
			return fmt.Errorf("%s: xattr key: %v", path, err)
		}
		value, err := unescapeDump(v)
		if err != nil {
			return fmt.Errorf("%s: xattr %s value: %v", path, key, err)
		}
		if err := setXattrChecked(n, string(key), value); err != nil {
			return fmt.Errorf("%s: %v", path, err)
		}
	}
	return nil
}

// add places n at path, whose parent must exist already.
func (p *dumpParser) add(path string, n *Node) error {
	if !strings.HasPrefix(path, "/") {
		return fmt.Errorf("PATH %q is not absolute", truncateForError(path))
	}
	// Components are the non-empty parts between '/'s.
	end := len(path)
	for end > 0 && path[end-1] == '/' {
		end--
	}
	if end == 0 {
		if n.Type() != ModeDir {
			return errors.New("root must be a directory")
		}
		if p.root != nil {
			return errors.New("more than one root line")
		}
		p.root = n
		return nil
	}
	if p.root == nil {
		return fmt.Errorf("%s: the first line must be the root directory", path)
	}
	slash := strings.LastIndexByte(path[:end], '/')
	dir, name := path[:slash+1], path[slash+1:end]
	parent := p.lastDir
	if parent == nil || dir != p.lastDirPath {
		parent = p.root
		for rest := dir; rest != ""; {
			var c string
			c, rest, _ = strings.Cut(rest, "/")
			if c == "" {
				continue
			}
			if c == "." || c == ".." {
				return fmt.Errorf("%s: invalid . or .. in path", path)
			}
			parent = parent.Child(c)
			if parent == nil {
				missing := strings.Join(strings.FieldsFunc(dir[:len(dir)-len(rest)], func(r rune) bool { return r == '/' }), "/")
				return fmt.Errorf("%s: parent directory /%s missing", path, missing)
			}
		}
		if !parent.IsDir() {
			return fmt.Errorf("%s: parent is not a directory", path)
		}
		p.lastDir, p.lastDirPath = parent, dir
	}
	n.Name = name
	if err := parent.AddChild(n); err != nil {
		if parent.Child(n.Name) != nil {
			return fmt.Errorf("%s: path already exists", path)
		}
		return fmt.Errorf("%s: %v", path, err)
	}
	return nil
}

func (p *dumpParser) resolveHardlinks() error {
	for _, h := range p.hardlinks {
		target := p.root.Lookup(h.target)
		if target == nil {
			return fmt.Errorf("%s: hardlink target %s does not exist", h.node.Path(), h.target)
		}
		if target == h.node {
			return fmt.Errorf("%s: hardlink to itself", h.node.Path())
		}
		h.node.LinkTo = target
	}
	for _, h := range p.hardlinks {
		target, err := followLinks(h.node)
		if err != nil {
			return fmt.Errorf("%s: %v", h.node.Path(), err)
		}
		if target.IsDir() {
			return fmt.Errorf("%s: hardlink target %s is a directory", h.node.Path(), target.Path())
		}
	}
	return nil
}

// followLinks resolves a hardlink chain, detecting cycles.
func followLinks(n *Node) (*Node, error) {
	slow := n
	for n.LinkTo != nil {
		n = n.LinkTo
		if n.LinkTo == nil {
			break
		}
		n = n.LinkTo
		slow = slow.LinkTo
		if n == slow {
			return nil, errors.New("hardlink cycle")
		}
	}
	return n, nil
}

func validateMode(mode uint32) error {
	if mode&^0o177777 != 0 {
		return fmt.Errorf("mode %o has bits beyond the file type and permissions", mode)
	}
	switch mode & ModeTypeMask {
	case ModeRegular, ModeDir, ModeSymlink, ModeBlock, ModeChar, ModeSocket, ModeFIFO:
		return nil
	}
	return fmt.Errorf("mode %o has no valid file type", mode)
}

func parseUint(b []byte, base, bitSize int) (uint64, error) {
	if len(b) == 0 {
		return 0, errors.New("empty number")
	}
	for _, c := range b {
		if c < '0' || c > '9' || (base == 8 && c > '7') {
			return 0, fmt.Errorf("invalid number %q", truncateForError(string(b)))
		}
	}
	v, err := strconv.ParseUint(string(b), base, bitSize)
	if err != nil {
		return 0, fmt.Errorf("number %q out of range", truncateForError(string(b)))
	}
	return v, nil
}

// parseMtime parses SEC.NSEC, where NSEC is an integer count of nanoseconds.
func parseMtime(b []byte) (Timespec, error) {
	secB, nsecB, ok := bytes.Cut(b, []byte{'.'})
	if !ok {
		return Timespec{}, fmt.Errorf("%q is not SEC.NSEC", truncateForError(string(b)))
	}
	neg := len(secB) > 0 && secB[0] == '-'
	if neg {
		secB = secB[1:]
	}
	sec, err := parseUint(secB, 10, 63)
	if err != nil {
		return Timespec{}, fmt.Errorf("seconds: %v", err)
	}
	nsec, err := parseUint(nsecB, 10, 32)
	if err != nil || nsec >= 1e9 {
		return Timespec{}, fmt.Errorf("nanoseconds %q not in 0..999999999", truncateForError(string(nsecB)))
	}
	t := Timespec{Sec: int64(sec), Nsec: uint32(nsec)}
	if neg {
		t.Sec = -t.Sec
	}
	return t, nil
}

// unescapeOptional unescapes a field where "-" alone means absent.
func unescapeOptional(b []byte) ([]byte, bool, error) {
	if len(b) == 1 && b[0] == '-' {
		return nil, false, nil
	}
	v, err := unescapeDump(b)
	return v, err == nil, err
}

// unescapeDump undoes the dumpfile escapes \\ \n \r \t \xHH.
func unescapeDump(b []byte) ([]byte, error) {
	if bytes.IndexByte(b, '\\') < 0 {
		return append([]byte(nil), b...), nil
	}
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c != '\\' {
			out = append(out, c)
			continue
		}
		i++
		if i >= len(b) {
			return nil, errors.New("no character after escape")
		}
		switch b[i] {
		case '\\':
			out = append(out, '\\')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'x':
			if i+2 >= len(b) {
				return nil, errors.New("\\x escape needs two hex digits")
			}
			hi, lo := unhex(b[i+1]), unhex(b[i+2])
			if hi < 0 || lo < 0 {
				return nil, fmt.Errorf("invalid hex escape \\x%c%c", b[i+1], b[i+2])
			}
			out = append(out, byte(hi<<4|lo))
			i += 2
		default:
			return nil, fmt.Errorf("unsupported escape \\%c", b[i])
		}
	}
	return out, nil
}

func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// setXattrChecked sets an xattr from external input, enforcing the limits
// mkcomposefs enforces: key 1..255 bytes, value up to 65535 bytes, and a
// per-inode budget of Σ(7 + len(key) + len(value)) + 12 ≤ 32767.
func setXattrChecked(n *Node, key string, value []byte) error {
	if len(key) == 0 || len(key) > MaxXattrKeyLen {
		return fmt.Errorf("xattr key %q: length must be 1..%d", truncateForError(key), MaxXattrKeyLen)
	}
	if strings.IndexByte(key, 0) >= 0 {
		return fmt.Errorf("xattr key %q contains NUL", truncateForError(key))
	}
	if len(value) > MaxXattrValueLen {
		return fmt.Errorf("xattr %s: value of %d bytes is longer than %d", key, len(value), MaxXattrValueLen)
	}
	n.RemoveXattr(key)
	if xattrBudget(n.Xattrs)+7+len(key)+len(value) > maxXattrBudget {
		return fmt.Errorf("xattr %s: the inode's xattrs exceed %d bytes", key, maxXattrBudget)
	}
	n.SetXattr(key, value)
	return nil
}

func xattrBudget(xs []Xattr) int {
	if len(xs) == 0 {
		return 12
	}
	total := 12
	for _, x := range xs {
		total += 7 + len(x.Key) + len(x.Value)
	}
	return total
}

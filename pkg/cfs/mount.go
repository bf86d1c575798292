package cfs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// VerityMode says how the content of a mounted image is verified.
type VerityMode string

const (
	// VerityRequire is kernel-enforced: every object has fs-verity enabled,
	// overlayfs checks each against its metacopy digest (verity=require),
	// and the kernel's digest of the image file must equal the expected
	// image digest. Refused where the object store has no fs-verity.
	VerityRequire VerityMode = "require"
	// VerityUserspace relies on digests checked in userspace when objects
	// enter the store; the image is checked against the expected digest
	// (when one is given) before mounting. The mount has no verity= option.
	VerityUserspace VerityMode = "userspace"
	// VerityOff checks nothing.
	VerityOff VerityMode = "off"
)

// ParseVerityMode parses "require", "userspace" or "off" ("" is off).
func ParseVerityMode(s string) (VerityMode, error) {
	switch VerityMode(s) {
	case VerityRequire, VerityUserspace, VerityOff:
		return VerityMode(s), nil
	case "":
		return VerityOff, nil
	}
	return "", fmt.Errorf("verity mode %q: want require, userspace or off", s)
}

// MountOptions are the options of Mount.
type MountOptions struct {
	// ObjectDirs are the object stores, searched in order as overlayfs
	// data-only lower layers: the node store first, then read-only extra
	// stores (e.g. a host composefs/ostree repository's objects/).
	ObjectDirs []string
	// Verity is the verification mode; "" means VerityOff.
	Verity VerityMode
	// NoExec adds noexec to the mount (nodev and nosuid are always set).
	NoExec bool
	// ImageDigest is the expected fs-verity digest of the image file.
	// Required by VerityRequire, checked in userspace by VerityUserspace,
	// and recorded in the mount source ("composefs:<digest>") in every mode
	// so that the mount can be recognised later.
	ImageDigest *Digest
	// SELinuxContext, when set, is the overlay's context= mount option:
	// every file of the mount carries this label (what the kubelet asks
	// for with seLinuxMount). Only the overlay gets it: it is all a reader
	// sees, and overlayfs reads its layers with the mounter's credentials.
	// Needs a kernel with SELinux; see CheckSELinuxContext for the syntax.
	SELinuxContext string
	// ForceLegacy takes the fallback path for kernels without the new mount
	// API (loop device, mount(2) with lowerdir=E::O1::O2). For tests.
	ForceLegacy bool
}

// MountPath names the way a mount was made.
type MountPath string

const (
	// MountPathDetached: a detached file-backed erofs mount handed to
	// overlayfs by file descriptor (fsconfig lowerdir+ fd; kernel ≥ 6.15).
	MountPathDetached MountPath = "new-api"
	// MountPathPrivateDir: new mount API, with the erofs mount attached to a
	// private temporary directory only until the overlay holds it.
	MountPathPrivateDir MountPath = "new-api-tmpdir"
	// MountPathLegacy: mount(2) with lowerdir=E::O1::O2.
	MountPathLegacy MountPath = "legacy"
)

// MountResult reports how a mount was made.
type MountResult struct {
	Verity     VerityMode // the mode the mount got
	Path       MountPath
	LoopDevice string // "/dev/loopN" when erofs needed a loop device
	Source     string // the overlay source shown in mountinfo
}

// Errors Mount wraps.
var (
	ErrAlreadyMounted      = errors.New("target is a mount point already")
	ErrImageDigestMismatch = errors.New("image digest mismatch")
	ErrNotComposefsImage   = errors.New("not a composefs image")
)

// composefs header magic (first 4 bytes, little endian) and the HAS_ACL flag.
const (
	cfsHeaderMagic  = 0xd078629a
	cfsFlagHasACL   = 1
	cfsHeaderLength = 32
)

// Mount mounts the composefs image at target: a read-only erofs of the
// image, under a read-only overlayfs (nodev, nosuid, and noexec when asked;
// metacopy=on, redirect_dir=on) whose data-only layers are opts.ObjectDirs.
// The erofs mount is never visible: it is detached (or, on kernels that
// cannot use a detached mount as a layer, unmounted once the overlay holds
// it), and file-backed unless the kernel needs a loop device.
func Mount(ctx context.Context, image, target string, opts MountOptions) (MountResult, error) {
	res, err := mount(ctx, image, target, opts, false)
	if err != nil {
		return MountResult{}, fmt.Errorf("mounting composefs image %s on %s: %w", image, target, err)
	}
	return res, nil
}

// mount does Mount; privateDirLayer (for tests) takes the path of kernels
// that cannot use a detached mount as an overlay layer.
func mount(ctx context.Context, image, target string, opts MountOptions, privateDirLayer bool) (MountResult, error) {
	if err := ctx.Err(); err != nil {
		return MountResult{}, err
	}
	mode, err := ParseVerityMode(string(opts.Verity))
	if err != nil {
		return MountResult{}, err
	}
	if len(opts.ObjectDirs) == 0 {
		return MountResult{}, errors.New("no object directory given")
	}
	if opts.SELinuxContext != "" {
		if err := CheckSELinuxContext(opts.SELinuxContext); err != nil {
			return MountResult{}, err
		}
	}
	dirs := make([]string, len(opts.ObjectDirs))
	for i, d := range opts.ObjectDirs {
		abs, err := filepath.Abs(d)
		if err != nil {
			return MountResult{}, fmt.Errorf("object directory %s: %w", d, err)
		}
		if st, err := os.Stat(abs); err != nil {
			return MountResult{}, fmt.Errorf("object directory: %w", err)
		} else if !st.IsDir() {
			return MountResult{}, fmt.Errorf("object directory %s: not a directory", d)
		}
		dirs[i] = abs
	}
	if err := checkTarget(target); err != nil {
		return MountResult{}, err
	}

	img, err := os.OpenFile(image, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return MountResult{}, err
	}
	defer img.Close()
	hasACL, err := readImageHeader(img)
	if err != nil {
		return MountResult{}, err
	}
	if err := checkVerity(ctx, img, dirs, mode, opts.ImageDigest); err != nil {
		return MountResult{}, err
	}
	if err := ctx.Err(); err != nil {
		return MountResult{}, err
	}

	m := &mounter{
		img:    img,
		hasACL: hasACL,
		dirs:   dirs,
		target: target,
		verity: mode == VerityRequire,
		noexec: opts.NoExec,
		source: MountSourcePrefix,
		label:  opts.SELinuxContext,

		privateDirLayer: privateDirLayer,
	}
	if opts.ImageDigest != nil {
		m.source = MountSourcePrefix + ":" + opts.ImageDigest.String()
	}
	path, err := m.run(opts.ForceLegacy)
	if err != nil {
		return MountResult{}, err
	}
	return MountResult{Verity: mode, Path: path, LoopDevice: m.loopDev, Source: m.source}, nil
}

// checkTarget requires an existing directory that is not a mount point.
func checkTarget(target string) error {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, target, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_TYPE, &stx); err != nil {
		return fmt.Errorf("target: %w", &os.PathError{Op: "statx", Path: target, Err: err})
	}
	if stx.Mode&unix.S_IFMT != unix.S_IFDIR {
		return fmt.Errorf("target %s: not a directory", target)
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 && stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0 {
		return fmt.Errorf("target %s: %w", target, ErrAlreadyMounted)
	}
	return nil
}

// readImageHeader checks the composefs magic and returns the HAS_ACL flag.
func readImageHeader(img *os.File) (hasACL bool, err error) {
	var hdr [cfsHeaderLength]byte
	if _, err := img.ReadAt(hdr[:], 0); err != nil {
		if errors.Is(err, io.EOF) {
			return false, fmt.Errorf("%s: %w: shorter than its header", img.Name(), ErrNotComposefsImage)
		}
		return false, fmt.Errorf("reading the header of %s: %w", img.Name(), err)
	}
	if m := binary.LittleEndian.Uint32(hdr[0:]); m != cfsHeaderMagic {
		return false, fmt.Errorf("%s: %w: magic %#08x, want %#08x", img.Name(), ErrNotComposefsImage, m, cfsHeaderMagic)
	}
	return binary.LittleEndian.Uint32(hdr[8:])&cfsFlagHasACL != 0, nil
}

// checkVerity does what the verity mode asks before anything is mounted.
func checkVerity(ctx context.Context, img *os.File, dirs []string, mode VerityMode, want *Digest) error {
	switch mode {
	case VerityRequire:
		if want == nil {
			return errors.New("verity=require needs the expected image digest")
		}
		for _, d := range dirs {
			ok, err := VeritySupport(d)
			if err != nil {
				return fmt.Errorf("verity=require: %w", err)
			}
			if !ok {
				return fmt.Errorf("verity=require: object directory %s: %w (the kernel or filesystem cannot enable it; use verity mode userspace)", d, ErrVerityUnsupported)
			}
		}
		got, err := MeasureVerity(img)
		if err != nil {
			return fmt.Errorf("verity=require: %w", err)
		}
		if got != *want {
			return fmt.Errorf("verity=require: %w: the kernel measures %s, want %s", ErrImageDigestMismatch, got, want)
		}
	case VerityUserspace:
		if want == nil {
			return nil
		}
		got, _, err := VerityDigestReader(ContextReader(ctx, io.NewSectionReader(img, 0, 1<<62)))
		if err != nil {
			return fmt.Errorf("checking the image digest: %w", err)
		}
		if got != *want {
			return fmt.Errorf("%w: the image has digest %s, want %s", ErrImageDigestMismatch, got, want)
		}
	}
	return nil
}

// mounter carries one Mount through its steps.
type mounter struct {
	img    *os.File
	hasACL bool
	dirs   []string
	target string
	verity bool
	noexec bool
	source string
	label  string // SELinux context= of the overlay, or ""

	privateDirLayer bool // skip handing overlayfs the detached erofs by fd
	loopDev         string
}

// errLegacy sends the mount to the mount(2) path.
var errLegacy = errors.New("new mount API unusable")

func (m *mounter) run(forceLegacy bool) (MountPath, error) {
	if !forceLegacy {
		path, err := m.runNewAPI()
		if !errors.Is(err, errLegacy) {
			return path, err
		}
	}
	er, err := m.legacyErofs()
	if err != nil {
		return "", err
	}
	defer er.release()
	return MountPathLegacy, m.legacyOverlay(er)
}

// erofsMount is the image's erofs: either a detached mount (fd ≥ 0) or a
// mount on a private temporary directory (dir != "").
type erofsMount struct {
	fd  int
	dir string
}

// attach moves a detached erofs onto a fresh temporary directory.
func (e *erofsMount) attach() error {
	if e.dir != "" {
		return nil
	}
	dir, err := os.MkdirTemp("", ".composefs-erofs-")
	if err != nil {
		return fmt.Errorf("creating a directory for the erofs mount: %w", err)
	}
	if err := unix.MoveMount(e.fd, "", unix.AT_FDCWD, dir, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		os.Remove(dir)
		return fmt.Errorf("attaching the erofs mount at %s: %w", dir, err)
	}
	unix.Close(e.fd)
	e.fd, e.dir = -1, dir
	return nil
}

// release drops the erofs mount; an overlay that uses it keeps it alive.
func (e *erofsMount) release() {
	if e.fd >= 0 {
		unix.Close(e.fd)
		e.fd = -1
	}
	if e.dir != "" {
		unix.Unmount(e.dir, unix.MNT_DETACH)
		os.Remove(e.dir)
		e.dir = ""
	}
}

// runNewAPI mounts with fsopen/fsconfig/fsmount/move_mount. It returns an
// error wrapping errLegacy when this kernel needs the mount(2) path.
func (m *mounter) runNewAPI() (MountPath, error) {
	fd, err := m.newAPIErofs("/proc/self/fd/" + fmt.Sprint(m.img.Fd()))
	if errors.Is(err, unix.ENOTBLK) {
		// No file-backed erofs (kernel < 6.12): back it with a loop device.
		var loop *os.File
		loop, m.loopDev, err = attachLoop(m.img)
		if err != nil {
			return "", err
		}
		fd, err = m.newAPIErofs(m.loopDev)
		loop.Close() // the erofs superblock holds the device now; autoclear does the rest
	}
	if err != nil {
		return "", err
	}
	er := &erofsMount{fd: fd}
	defer er.release()
	return m.newAPIOverlay(er)
}

// newAPIErofs makes a detached read-only erofs mount of source.
func (m *mounter) newAPIErofs(source string) (int, error) {
	fsfd, err := unix.Fsopen("erofs", unix.FSOPEN_CLOEXEC)
	switch {
	case errors.Is(err, unix.ENOSYS):
		return -1, fmt.Errorf("%w: fsopen: %v", errLegacy, err)
	case errors.Is(err, unix.ENODEV):
		return -1, errors.New("kernel lacks erofs (CONFIG_EROFS_FS)")
	case err != nil:
		return -1, fmt.Errorf("fsopen erofs: %w", err)
	}
	defer unix.Close(fsfd)
	if err := unix.FsconfigSetString(fsfd, "source", source); err != nil {
		return -1, fsError(fsfd, "erofs: fsconfig source="+source, err)
	}
	if err := unix.FsconfigSetFlag(fsfd, "ro"); err != nil {
		return -1, fsError(fsfd, "erofs: fsconfig ro", err)
	}
	if !m.hasACL {
		if err := unix.FsconfigSetFlag(fsfd, "noacl"); err != nil {
			return -1, fsError(fsfd, "erofs: fsconfig noacl", err)
		}
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		if errors.Is(err, unix.ENOTBLK) {
			return -1, err
		}
		return -1, fsError(fsfd, "erofs: creating the superblock", err)
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_RDONLY|unix.MOUNT_ATTR_NODEV|unix.MOUNT_ATTR_NOSUID)
	if err != nil {
		return -1, fsError(fsfd, "erofs: fsmount", err)
	}
	return mfd, nil
}

// newAPIOverlay mounts the overlay on the target with lowerdir+/datadir+.
func (m *mounter) newAPIOverlay(er *erofsMount) (MountPath, error) {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	switch {
	case errors.Is(err, unix.ENODEV):
		return "", errors.New("kernel lacks overlayfs (CONFIG_OVERLAY_FS)")
	case err != nil:
		return "", fmt.Errorf("fsopen overlay: %w", err)
	}
	defer unix.Close(fsfd)
	// An overlayfs that accepts unknown keys parses options the legacy way.
	if err := unix.FsconfigSetString(fsfd, "unsupported", "unsupported"); err == nil {
		return "", fmt.Errorf("%w: overlayfs accepts unknown fsconfig keys", errLegacy)
	}
	drainFsLog(fsfd)
	for _, kv := range [][2]string{{"source", m.source}, {"metacopy", "on"}, {"redirect_dir", "on"}} {
		if err := unix.FsconfigSetString(fsfd, kv[0], kv[1]); err != nil {
			return "", fsError(fsfd, "overlay: fsconfig "+kv[0]+"="+kv[1], err)
		}
	}
	if m.verity {
		if err := unix.FsconfigSetString(fsfd, "verity", "require"); err != nil {
			return "", fsError(fsfd, "overlayfs without verity= (needs ≥ 6.6)", err)
		}
	}
	if m.label != "" {
		if err := unix.FsconfigSetString(fsfd, "context", m.label); err != nil {
			return "", fsError(fsfd, "overlay: fsconfig context="+m.label+" (needs a kernel with SELinux)", err)
		}
	}
	path := MountPathDetached
	err = errLegacy
	if !m.privateDirLayer {
		err = unix.FsconfigSetFd(fsfd, "lowerdir+", er.fd)
	}
	if err != nil {
		// Detached mounts as layers need ≥ 6.15: attach it privately.
		drainFsLog(fsfd)
		if err := er.attach(); err != nil {
			return "", err
		}
		if err := unix.FsconfigSetString(fsfd, "lowerdir+", er.dir); err != nil {
			if errors.Is(err, unix.EINVAL) {
				return "", fmt.Errorf("%w: overlay lowerdir+ (needs ≥ 6.7): %v", errLegacy, err)
			}
			return "", fsError(fsfd, "overlay: fsconfig lowerdir+="+er.dir, err)
		}
		path = MountPathPrivateDir
	}
	for _, d := range m.dirs {
		if err := unix.FsconfigSetString(fsfd, "datadir+", d); err != nil {
			if errors.Is(err, unix.EINVAL) {
				return "", fmt.Errorf("%w: overlay datadir+ (needs ≥ 6.7): %v", errLegacy, err)
			}
			return "", fsError(fsfd, "overlay: fsconfig datadir+="+d, err)
		}
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return "", fsError(fsfd, "overlay: creating the superblock", err)
	}
	attrs := unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NODEV | unix.MOUNT_ATTR_NOSUID
	if m.noexec {
		attrs |= unix.MOUNT_ATTR_NOEXEC
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, attrs)
	if err != nil {
		return "", fsError(fsfd, "overlay: fsmount", err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, m.target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return "", fmt.Errorf("attaching the overlay at %s: %w", m.target, err)
	}
	return path, nil
}

// legacyErofs mounts the image with mount(2) through a loop device on a
// private temporary directory.
func (m *mounter) legacyErofs() (*erofsMount, error) {
	loop, dev, err := attachLoop(m.img)
	if err != nil {
		return nil, err
	}
	defer loop.Close() // after the mount: autoclear then frees the device on unmount
	m.loopDev = dev
	dir, err := os.MkdirTemp("", ".composefs-erofs-")
	if err != nil {
		return nil, fmt.Errorf("creating a directory for the erofs mount: %w", err)
	}
	data := ""
	if !m.hasACL {
		data = "noacl"
	}
	err = unix.Mount(dev, dir, "erofs", unix.MS_RDONLY|unix.MS_NODEV|unix.MS_NOSUID|unix.MS_SILENT, data)
	if err != nil {
		os.Remove(dir)
		if errors.Is(err, unix.ENODEV) {
			return nil, errors.New("kernel lacks erofs (CONFIG_EROFS_FS)")
		}
		return nil, fmt.Errorf("mounting erofs from %s: %w", dev, err)
	}
	return &erofsMount{fd: -1, dir: dir}, nil
}

// maxLegacyOptions is the size of the page mount(2) copies its data from.
const maxLegacyOptions = 4095

// legacyOverlay mounts the overlay with mount(2) and lowerdir=E::O1::O2.
func (m *mounter) legacyOverlay(er *erofsMount) error {
	lower := []string{escapeLowerdir(er.dir)}
	for _, d := range m.dirs {
		lower = append(lower, escapeLowerdir(d))
	}
	base := "metacopy=on,redirect_dir=on,lowerdir="
	data := base + strings.Join(lower, "::")
	if m.verity {
		data += ",verity=require"
	}
	noLabel := data
	if m.label != "" {
		// Quoted: a level holds commas (s0:c1,c2); the kernel's LSM option
		// parser takes the quotes off.
		data += `,context="` + m.label + `"`
	}
	if len(data) > maxLegacyOptions {
		return fmt.Errorf("overlay options are %d bytes, over the %d bytes mount(2) takes: use shorter object directory paths", len(data), maxLegacyOptions)
	}
	flags := uintptr(unix.MS_RDONLY | unix.MS_NODEV | unix.MS_NOSUID)
	if m.noexec {
		flags |= unix.MS_NOEXEC
	}
	err := unix.Mount(m.source, m.target, "overlay", flags|unix.MS_SILENT, data)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ENODEV):
		return errors.New("kernel lacks overlayfs (CONFIG_OVERLAY_FS)")
	case !errors.Is(err, unix.EINVAL):
		return fmt.Errorf("mounting overlay (mount(2), %s): %w", data, err)
	}
	// Tell which feature is missing by mounting without it.
	probe := func(d string) bool {
		if unix.Mount(m.source, m.target, "overlay", flags|unix.MS_SILENT, d) != nil {
			return false
		}
		unix.Unmount(m.target, unix.MNT_DETACH)
		return true
	}
	if m.label != "" && probe(noLabel) {
		return fmt.Errorf("overlayfs refused context=%s (needs a kernel with SELinux): %w", m.label, err)
	}
	full := base + strings.Join(lower, "::")
	if m.verity && probe(full) {
		return fmt.Errorf("overlayfs without verity= (needs ≥ 6.6): %w", err)
	}
	if probe(base+lower[0]) || probe("lowerdir="+lower[0]) {
		return fmt.Errorf("overlayfs without data-only layers (needs ≥ 6.5): %w", err)
	}
	return fmt.Errorf("mounting overlay (mount(2), %s): %w", data, err)
}

// escapeLowerdir escapes the characters overlayfs splits lowerdir on.
func escapeLowerdir(p string) string {
	r := strings.NewReplacer(`\`, `\\`, `:`, `\:`, `,`, `\,`)
	return r.Replace(p)
}

// fsError wraps an fsconfig/fsmount error with the messages the kernel left
// in the filesystem context.
func fsError(fsfd int, what string, err error) error {
	if msg := drainFsLog(fsfd); msg != "" {
		return fmt.Errorf("%s: %w (kernel: %s)", what, err, msg)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// drainFsLog reads the messages queued on a filesystem context.
func drainFsLog(fsfd int) string {
	var msgs []string
	buf := make([]byte, 4096)
	for range 32 {
		n, err := unix.Read(fsfd, buf)
		if err != nil || n <= 0 {
			break
		}
		msgs = append(msgs, strings.TrimSpace(string(buf[:n])))
	}
	return strings.Join(msgs, "; ")
}

// Unmount unmounts target. lazy detaches it even while in use (MNT_DETACH).
// An absent target, or one with nothing mounted, is not an error.
func Unmount(target string, lazy bool) error {
	flags := unix.UMOUNT_NOFOLLOW
	if lazy {
		flags |= unix.MNT_DETACH
	}
	var err error
	for {
		err = unix.Unmount(target, flags)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	switch {
	case err == nil, errors.Is(err, unix.ENOENT):
		return nil
	case errors.Is(err, unix.EINVAL):
		// Not a mount point (or already unmounted).
		if _, mounted, ierr := IsMounted(target); ierr == nil && !mounted {
			return nil
		}
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("unmounting %s: %w (still in use; a lazy unmount detaches it anyway)", target, err)
	}
	return fmt.Errorf("unmounting %s: %w", target, err)
}

package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// Access modes a read-only volume accepts: the reader-only ones, and
// SINGLE_NODE_WRITER, which kubelet uses for inline volumes.
var allowedModes = map[csi.VolumeCapability_AccessMode_Mode]bool{
	csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY: true,
	csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:  true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER:      true,
}

// NodeGetCapabilities advertises volume stats with volume condition.
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	rpc := func(t csi.NodeServiceCapability_RPC_Type) *csi.NodeServiceCapability {
		return &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}}
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: []*csi.NodeServiceCapability{
		rpc(csi.NodeServiceCapability_RPC_GET_VOLUME_STATS),
		rpc(csi.NodeServiceCapability_RPC_VOLUME_CONDITION),
	}}, nil
}

// NodeGetInfo returns the node id; the node has no volume limit.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.cfg.NodeID}, nil
}

// checkTargetPath validates a target path field.
func checkTargetPath(field, p string) (string, error) {
	if p == "" {
		return "", status.Errorf(codes.InvalidArgument, "%s is required", field)
	}
	if !filepath.IsAbs(p) {
		return "", status.Errorf(codes.InvalidArgument, "%s %q must be absolute", field, p)
	}
	return filepath.Clean(p), nil
}

func checkCapability(vc *csi.VolumeCapability) error {
	if vc == nil {
		return status.Error(codes.InvalidArgument, "volume_capability is required")
	}
	if vc.GetBlock() != nil {
		return status.Error(codes.InvalidArgument, "volume_capability: block access is not supported (composefs volumes are filesystems)")
	}
	if vc.GetMount() == nil {
		return status.Error(codes.InvalidArgument, "volume_capability: mount access type is required")
	}
	m := vc.GetAccessMode().GetMode()
	if !allowedModes[m] {
		return status.Errorf(codes.InvalidArgument, "volume_capability.access_mode %s is not supported: composefs volumes are read-only (use a *_READER_ONLY mode)", m)
	}
	_, err := mountFlags(vc)
	return err
}

// mountOpts are what volume_capability.mount.mount_flags add to a mount.
type mountOpts struct {
	noexec         bool
	seLinuxContext string // from context="…" (seLinuxMount), or ""
}

// mountFlags reads volume_capability.mount.mount_flags (a PV's
// mountOptions, and the context= the kubelet adds with seLinuxMount).
// Composefs volumes are always ro, nodev and nosuid; noexec may be added.
// Anything else is refused rather than silently ignored.
func mountFlags(vc *csi.VolumeCapability) (mountOpts, error) {
	var o mountOpts
	for _, f := range vc.GetMount().GetMountFlags() {
		switch {
		case f == "ro", f == "nodev", f == "nosuid":
		case f == "noexec":
			o.noexec = true
		case strings.HasPrefix(f, "context="):
			c, err := parseContextFlag(f)
			if err != nil {
				return mountOpts{}, err
			}
			if o.seLinuxContext != "" && o.seLinuxContext != c {
				return mountOpts{}, status.Errorf(codes.InvalidArgument, "volume_capability.mount.mount_flags: two different context= flags")
			}
			o.seLinuxContext = c
		default:
			return mountOpts{}, status.Errorf(codes.InvalidArgument,
				"volume_capability.mount.mount_flags: %q is not supported (composefs volumes are always ro,nodev,nosuid and accept noexec, and context= on SELinux nodes)", f)
		}
	}
	return o, nil
}

// NodePublishVolume mounts the volume's image read-only at the target.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	start := d.now()
	err := d.publish(ctx, req)
	d.metrics.observePublish(errorCode(err), d.now().Sub(start))
	if err != nil {
		return nil, err
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *Driver) publish(ctx context.Context, req *csi.NodePublishVolumeRequest) error {
	if req.GetVolumeId() == "" {
		return status.Error(codes.InvalidArgument, "volume_id is required")
	}
	target, err := checkTargetPath("target_path", req.GetTargetPath())
	if err != nil {
		return err
	}
	if err := checkCapability(req.GetVolumeCapability()); err != nil {
		return err
	}
	if err := d.checkSELinux(req.GetVolumeCapability()); err != nil {
		return err
	}
	spec, err := ParseVolumeContext(req.GetVolumeContext())
	if err != nil {
		return err
	}
	creds, err := ParseSecrets(req.GetSecrets())
	if err != nil {
		return err
	}
	log := klog.FromContext(ctx).WithValues("volumeID", req.GetVolumeId(), "target", target)
	if spec.Pod.Name != "" {
		log = log.WithValues("pod", klog.KRef(spec.Pod.Namespace, spec.Pod.Name))
	}
	ctx = klog.NewContext(ctx, log)
	if !d.cfg.AllowedSources.Allows(spec.Source) {
		return status.Errorf(codes.PermissionDenied, "%s: source %s is not allowed on this node (--allowed-sources)", AttrRepository, fetch.RedactURL(spec.Source.URL))
	}
	mode := effectiveVerity(spec.Verity, d.cfg.MinVerity)
	if mode == cfs.VerityRequire && !d.store.VerityEnabled() {
		return status.Errorf(codes.FailedPrecondition, "%s: require: this node's store has no fs-verity (kernel or filesystem), so it cannot enforce it", AttrVerity)
	}
	if mode == cfs.VerityRequire && spec.Ref.Digest.IsZero() {
		return status.Errorf(codes.InvalidArgument, "%s: required because this node requires verity (--min-verity=require)", AttrDigest)
	}
	if !d.ready.Load() {
		return status.Error(codes.Unavailable, "driver state not recovered yet")
	}
	if !d.locks.tryLock(target) {
		return status.Errorf(codes.Aborted, "an operation on target_path %s is in progress", target)
	}
	defer d.locks.unlock(target)

	// A repeat of a publish that succeeded: answer at once, with no fetch.
	adopt := false
	mi, mounted, err := d.mounter.MountAt(target)
	if err != nil {
		return toStatus("checking target_path", err)
	}
	rec, hasRec := d.state.get(target)
	params := publishParams(req)
	switch {
	case mounted && hasRec && rec.VolumeID != req.GetVolumeId():
		return status.Errorf(codes.AlreadyExists, "target_path %s already has volume %s published, not %s", target, rec.VolumeID, req.GetVolumeId())
	case mounted && hasRec && rec.Key == spec.Key():
		if why := rec.incompatibility(params, mi); why != "" {
			return status.Errorf(codes.AlreadyExists, "target_path %s: volume %s is already published there incompatibly: %s", target, rec.VolumeID, why)
		}
		if md, ok := mi.ImageDigest(); mi.IsComposefs() && (!ok || md.String() == rec.Image) {
			log.V(4).Info("Volume already published")
			return nil
		}
		return status.Errorf(codes.AlreadyExists, "target_path %s: another mount covers the volume's mount", target)
	case mounted && hasRec:
		return status.Errorf(codes.AlreadyExists, "target_path %s already has volume %s (%s) published", target, rec.VolumeID, rec.Key)
	case mounted && !mi.IsComposefs():
		return status.Errorf(codes.AlreadyExists, "target_path %s is already a mount point (%s %s)", target, mi.FSType, mi.Source)
	case mounted:
		// A composefs mount without a record: we crashed between the mount
		// and the record. Adopt it if it shows this volume's image.
		adopt = true
	case hasRec:
		log.Info("Volume record without a mount; publishing again", "image", rec.Image)
		d.unpin(target)
		if err := d.state.remove(target); err != nil {
			return toStatus("forgetting a stale volume", err)
		}
	}

	src, err := d.source(spec.Source, creds)
	if err != nil {
		return toStatus("making the source", err)
	}
	dg, err := d.ensure(ctx, spec, src, creds.fingerprint())
	if err != nil {
		d.reportFailure(ctx, spec.Pod, err)
		return toStatus(fmt.Sprintf("fetching image %s from %s", spec.Ref, fetch.RedactURL(spec.Source.URL)), err)
	}
	newRec := Record{
		Target:    target,
		VolumeID:  req.GetVolumeId(),
		Key:       spec.Key(),
		Image:     dg.String(),
		Source:    spec.Source.URL,
		Name:      spec.Ref.Name,
		Verity:    mode,
		Published: d.now().UTC(),
		Publish:   params,
	}
	if spec.Pod.Name != "" {
		newRec.Pod = spec.Pod.Namespace + "/" + spec.Pod.Name
	}
	if adopt {
		if md, ok := mi.ImageDigest(); !ok || md != dg {
			return status.Errorf(codes.AlreadyExists, "target_path %s already has another composefs image mounted (%s)", target, mi.Source)
		}
		if why := (Record{}).incompatibility(params, mi); why != "" {
			return status.Errorf(codes.AlreadyExists, "target_path %s: a composefs mount is there, %s", target, why)
		}
		d.pin(target, dg)
		if err := d.state.put(newRec); err != nil {
			d.unpin(target)
			return toStatus("recording the volume", err)
		}
		d.metrics.setVolumes(d.state.all())
		log.Info("Adopted a mount left by an interrupted publish", "image", dg.String())
		return nil
	}

	// From here on, undo everything on failure.
	created, err := makeTarget(target)
	if err != nil {
		return toStatus("creating target_path", err)
	}
	newRec.CreatedDir = created
	ok := false
	defer func() {
		if !ok && created {
			if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
				log.Error(err, "Removing the target directory after a failed publish")
			}
		}
	}()
	d.pin(target, dg)
	defer func() {
		if !ok {
			d.unpin(target)
		}
	}()
	flags, _ := mountFlags(req.GetVolumeCapability()) // checked above
	if err := d.mount(ctx, dg, target, mode, flags); err != nil {
		d.reportFailure(ctx, spec.Pod, err)
		return toStatus("mounting", err)
	}
	if err := d.state.put(newRec); err != nil {
		if uerr := d.mounter.Unmount(target); uerr != nil {
			log.Error(uerr, "Unmounting after a failed publish")
		}
		return toStatus("recording the volume", err)
	}
	ok = true
	d.metrics.setVolumes(d.state.all())
	log.V(2).Info("Volume published", "image", dg.String(), "verity", mode)
	return nil
}

// makeTarget creates the target directory (kubelet creates only its
// parent) and reports whether it did.
func makeTarget(target string) (bool, error) {
	fi, err := os.Lstat(target)
	switch {
	case err == nil && fi.IsDir():
		return false, nil
	case err == nil:
		return false, status.Errorf(codes.FailedPrecondition, "target_path %s exists and is not a directory", target)
	case !errors.Is(err, fs.ErrNotExist):
		return false, err
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return false, err
	}
	if err := os.Mkdir(target, 0o750); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return false, nil
		}
		return false, err
	}
	return true, nil
}

// mount mounts the stored image at target. The store verified the image's
// digest when the image entered it; in userspace mode the file is checked
// once more the first time this process mounts it, not on every publish
// (a warm publish must not re-read a large image).
func (d *Driver) mount(ctx context.Context, dg cfs.Digest, target string, mode cfs.VerityMode, flags mountOpts) error {
	mountMode := mode
	if mode == cfs.VerityUserspace {
		d.mu.Lock()
		if d.checked[dg] {
			mountMode = cfs.VerityOff // still records the digest in the mount source
		}
		d.mu.Unlock()
	}
	dirs := append([]string{d.store.ObjectsDir()}, d.cfg.ExtraObjectDirs...)
	_, err := d.mounter.Mount(ctx, d.store.ImagePath(dg), target, cfs.MountOptions{
		ObjectDirs:     dirs,
		Verity:         mountMode,
		ImageDigest:    &dg,
		NoExec:         flags.noexec,
		SELinuxContext: flags.seLinuxContext,
	})
	if err != nil {
		if errors.Is(err, cfs.ErrImageDigestMismatch) {
			d.metrics.verificationFailure()
		}
		return err
	}
	if mountMode != cfs.VerityOff {
		d.mu.Lock()
		d.checked[dg] = true
		d.mu.Unlock()
	}
	return nil
}

// NodeUnpublishVolume unmounts the target, removes it and releases the
// image. A target that is absent or not mounted is already unpublished.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	start := d.now()
	err := d.unpublish(ctx, req)
	d.metrics.observeUnpublish(errorCode(err), d.now().Sub(start))
	if err != nil {
		return nil, err
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func (d *Driver) unpublish(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) error {
	if req.GetVolumeId() == "" {
		return status.Error(codes.InvalidArgument, "volume_id is required")
	}
	target, err := checkTargetPath("target_path", req.GetTargetPath())
	if err != nil {
		return err
	}
	if !d.ready.Load() {
		return status.Error(codes.Unavailable, "driver state not recovered yet")
	}
	if !d.locks.tryLock(target) {
		return status.Errorf(codes.Aborted, "an operation on target_path %s is in progress", target)
	}
	defer d.locks.unlock(target)
	log := klog.FromContext(ctx).WithValues("volumeID", req.GetVolumeId(), "target", target)

	rec, hasRec := d.state.get(target)
	if hasRec && rec.VolumeID != req.GetVolumeId() {
		// Not this volume's publish: leave it alone (NOT_FOUND is the
		// spec's code for a volume_id that does not exist, here at this
		// target).
		return status.Errorf(codes.NotFound, "volume %s is not published at target_path %s (volume %s is); nothing was unmounted", req.GetVolumeId(), target, rec.VolumeID)
	}
	// Unmount every composefs mount stacked at target (normally one).
	for i := 0; ; i++ {
		mi, mounted, err := d.mounter.MountAt(target)
		if err != nil {
			return toStatus("checking target_path", err)
		}
		if !mounted {
			break
		}
		if !mi.IsComposefs() {
			return status.Errorf(codes.FailedPrecondition, "target_path %s has a %s mount (%s) this driver did not make", target, mi.FSType, mi.Source)
		}
		if i >= 8 {
			return status.Errorf(codes.Internal, "target_path %s: still mounted after %d unmounts", target, i)
		}
		if err := d.mounter.Unmount(target); err != nil {
			if errors.Is(err, unix.EBUSY) {
				// Never detach lazily: the content would lose its pin while a
				// process can still read it. Kubelet retries.
				return status.Errorf(codes.Unavailable, "target_path %s is busy: a process still uses the volume (or something is mounted inside it); it stays mounted and its content stays pinned until it is released", target)
			}
			return toStatus("unmounting target_path", err)
		}
	}
	if err := removeTarget(ctx, target, hasRec && rec.CreatedDir); err != nil {
		return toStatus("removing target_path", err)
	}
	d.unpin(target)
	if hasRec {
		if err := d.state.remove(target); err != nil {
			return toStatus("forgetting the volume", err)
		}
		log.V(2).Info("Volume unpublished", "image", rec.Image)
	}
	d.metrics.setVolumes(d.state.all())
	return nil
}

// removeTarget removes the target directory if the driver created it and
// it is still an empty directory. Whatever else is at the path (a
// directory that was there before publish, a file or a symlink put there,
// content written into the directory) is not the driver's and stays; a
// symlink is never followed.
func removeTarget(ctx context.Context, target string, created bool) error {
	log := klog.FromContext(ctx)
	if !created {
		log.V(4).Info("Leaving target_path in place: the driver did not create it")
		return nil
	}
	fi, err := os.Lstat(target)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return err
	case !fi.IsDir():
		log.Info("Leaving target_path in place: it is no longer the directory the driver created", "mode", fi.Mode().String())
		return nil
	}
	err = unix.Rmdir(target)
	switch {
	case err == nil, errors.Is(err, unix.ENOENT):
		return nil
	case errors.Is(err, unix.ENOTEMPTY), errors.Is(err, unix.EEXIST):
		log.Info("Leaving target_path in place: something not of the driver's is inside")
		return nil
	}
	return fmt.Errorf("removing %s: %w", target, err)
}

// NodeGetVolumeStats reports the image's bytes and inodes, and the
// volume's condition: abnormal when the mount is gone, the image file left
// the store (verification quarantined it: the mount keeps working, its
// objects stay pinned, and a new publish fetches the image again), or an
// object of the image is missing or has the wrong size in the store.
func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	}
	if req.GetVolumePath() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_path is required")
	}
	if !d.ready.Load() {
		return nil, status.Error(codes.Unavailable, "driver state not recovered yet")
	}
	path := filepath.Clean(req.GetVolumePath())
	rec, ok := d.state.get(path)
	if !ok || rec.VolumeID != req.GetVolumeId() {
		return nil, status.Errorf(codes.NotFound, "volume %s is not published at volume_path %s", req.GetVolumeId(), path)
	}
	dg, err := rec.digest()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "volume record of %s: %v", path, err)
	}
	st, err := d.imageStats(ctx, dg)
	if err != nil && ctx.Err() != nil {
		// Gave up waiting for the parse memory budget: the call failed,
		// not the volume.
		return nil, toStatus("reading the image's stats", err)
	}
	if err != nil {
		// The image file is gone or unreadable: that is the volume's
		// condition, not a failure of the call. Usage is unknown.
		return &csi.NodeGetVolumeStatsResponse{
			Usage: []*csi.VolumeUsage{
				{Unit: csi.VolumeUsage_BYTES},
				{Unit: csi.VolumeUsage_INODES},
			},
			VolumeCondition: &csi.VolumeCondition{Abnormal: true, Message: d.imageCondition(dg, err) + verityNote(rec.Verity)},
		}, nil
	}
	resp := &csi.NodeGetVolumeStatsResponse{
		Usage: []*csi.VolumeUsage{
			{Unit: csi.VolumeUsage_BYTES, Total: int64(st.TotalFileBytes), Used: int64(st.TotalFileBytes)},
			{Unit: csi.VolumeUsage_INODES, Total: int64(st.Inodes), Used: int64(st.Inodes)},
		},
		VolumeCondition: &csi.VolumeCondition{Message: "mounted; every object of the image is in the store" + verityNote(rec.Verity)},
	}
	if msg := d.checkVolume(ctx, path, dg); msg != "" {
		resp.VolumeCondition = &csi.VolumeCondition{Abnormal: true, Message: msg + verityNote(rec.Verity)}
	}
	return resp, nil
}

// verityNote says, at the end of a volume condition, how the volume's
// content is verified (CSI has no field for it).
func verityNote(mode cfs.VerityMode) string {
	switch mode {
	case cfs.VerityRequire:
		return "; verity: require (the kernel checks the image's digest and every page read from an object)"
	case cfs.VerityUserspace:
		return "; verity: userspace (digests checked when the content entered the store, not on reads)"
	}
	return "; verity: off (nothing checked at mount)"
}

// imageStats parses the image once (within the store's parse memory
// budget) and caches its summary.
func (d *Driver) imageStats(ctx context.Context, dg cfs.Digest) (cfs.ImageStats, error) {
	d.mu.Lock()
	ir, ok := d.infos[dg]
	d.mu.Unlock()
	if ok {
		return ir.stats, nil
	}
	st, err := d.store.ImageStats(ctx, dg)
	if err != nil {
		return cfs.ImageStats{}, err
	}
	d.mu.Lock()
	d.infos[dg] = &imgRef{stats: st}
	d.mu.Unlock()
	return st, nil
}

// checkVolume returns why the volume is abnormal, or "".
func (d *Driver) checkVolume(ctx context.Context, path string, dg cfs.Digest) string {
	mi, mounted, err := d.mounter.MountAt(path)
	if err != nil {
		return fmt.Sprintf("cannot read the mount table: %v", err)
	}
	if !mounted || !mi.IsComposefs() {
		return fmt.Sprintf("the composefs mount at %s is gone", path)
	}
	if !d.store.HasImage(dg) {
		return d.imageCondition(dg, nil)
	}
	objs, err := d.store.Objects(ctx, dg)
	if err != nil {
		return d.imageCondition(dg, err)
	}
	dirs := append([]string{d.store.ObjectsDir()}, d.cfg.ExtraObjectDirs...)
	for _, o := range objs {
		found := false
		for _, dir := range dirs {
			fi, err := os.Stat(filepath.Join(dir, o.Digest.ObjectPath()))
			if err == nil && fi.Mode().IsRegular() {
				if uint64(fi.Size()) != o.Size {
					return fmt.Sprintf("object %s is corrupt: %d bytes, the image records %d", o.Digest, fi.Size(), o.Size)
				}
				found = true
				break
			}
		}
		if !found {
			return fmt.Sprintf("object %s (%d bytes) of the image is missing from the store", o.Digest, o.Size)
		}
	}
	return ""
}

// imageCondition says why a volume whose image file is gone or unreadable
// is abnormal.
func (d *Driver) imageCondition(dg cfs.Digest, err error) string {
	if !d.store.HasImage(dg) {
		return fmt.Sprintf("image %s is no longer in the store (verification quarantined it, or it was removed); "+
			"the mount keeps serving and its objects stay pinned; publishing the volume again fetches the image again", dg)
	}
	return fmt.Sprintf("image %s is unreadable in the store: %v", dg, err)
}

package driver

import (
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// SELinux nodes: with seLinuxMount: true in the CSIDriver the kubelet adds
// context="<label>" to volume_capability.mount.mount_flags (quoted as Go
// quotes strings: the label's level holds commas). The label goes to the
// overlay's context= option, so the pod reads every file with it and no
// recursive relabelling is needed; each publish makes its own overlay
// superblock, so one image can be published with different labels.

// parseContextFlag returns the label of a context= mount flag, quoted
// (as the kubelet writes it) or bare (a PV's mountOptions).
func parseContextFlag(f string) (string, error) {
	v := strings.TrimPrefix(f, "context=")
	if strings.HasPrefix(v, `"`) {
		u, err := strconv.Unquote(v)
		if err != nil {
			return "", status.Errorf(codes.InvalidArgument, "volume_capability.mount.mount_flags: %s: unbalanced quotes", f)
		}
		v = u
	}
	if err := cfs.CheckSELinuxContext(v); err != nil {
		return "", status.Errorf(codes.InvalidArgument, "volume_capability.mount.mount_flags: %v", err)
	}
	return v, nil
}

// WithSELinux replaces the check whether the node runs SELinux (tests).
func WithSELinux(enabled func() bool) Option { return func(d *Driver) { d.selinux = enabled } }

// checkSELinux refuses a context= flag on a node without SELinux: the
// kernel would refuse the option, and a silently unlabelled volume is not
// what the pod asked for.
func (d *Driver) checkSELinux(vc *csi.VolumeCapability) error {
	o, err := mountFlags(vc)
	if err != nil || o.seLinuxContext == "" {
		return err
	}
	enabled := d.selinux
	if enabled == nil {
		enabled = cfs.SELinuxEnabled
	}
	if !enabled() {
		return status.Errorf(codes.FailedPrecondition,
			"volume_capability.mount.mount_flags: context=%q needs SELinux, which this node does not run (no selinuxfs); set seLinuxMount: false in the CSIDriver or drop context= from the PV's mountOptions", o.seLinuxContext)
	}
	return nil
}

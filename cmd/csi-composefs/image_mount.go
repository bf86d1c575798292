package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

func newImageMountCmd() *cobra.Command {
	var (
		objects []string
		verity  string
		digest  string
		noexec  bool
		legacy  bool
	)
	cmd := &cobra.Command{
		Use:   "mount [--objects DIR]... [--verity MODE] [--digest HEX] IMG MNT",
		Short: "Mount a composefs image read-only (erofs + overlayfs)",
		Long: `Mount the composefs image IMG read-only on the directory MNT: a file-backed
erofs of the image under an overlayfs whose data-only lower layers are the
object directories, searched in the order given (nodev, nosuid; noexec with
--noexec).

--verity MODE:
  require    kernel-enforced fs-verity: needs --digest, objects with fs-verity
             enabled and a store filesystem that supports it; refused otherwise
  userspace  objects were checked when they entered the store; with --digest
             the image is checked before mounting (the default with --digest)
  off        nothing is checked (the default without --digest)

Prints how the image was mounted: the verity mode, the mount path taken and
the overlay source that identifies the mount in /proc/self/mountinfo.`,
		Args: exactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(objects) == 0 {
				return usageErrorf("image mount: at least one --objects DIR is required")
			}
			opts := cfs.MountOptions{ObjectDirs: objects, NoExec: noexec, ForceLegacy: legacy}
			if digest != "" {
				d, err := cfs.ParseDigest(digest)
				if err != nil {
					return usageErrorf("image mount: --digest: %v", err)
				}
				opts.ImageDigest = &d
				if verity == "" {
					verity = string(cfs.VerityUserspace)
				}
			}
			mode, err := cfs.ParseVerityMode(verity)
			if err != nil {
				return usageErrorf("image mount: --verity: %v", err)
			}
			opts.Verity = mode
			res, err := cfs.Mount(cmd.Context(), args[0], args[1], opts)
			if err != nil {
				return err
			}
			loop := ""
			if res.LoopDevice != "" {
				loop = " loop=" + res.LoopDevice
			}
			fmt.Fprintf(cmd.OutOrStdout(), "mounted %s on %s: verity=%s path=%s source=%s%s\n",
				args[0], args[1], res.Verity, res.Path, res.Source, loop)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&objects, "objects", nil, "object directory (data-only lower layer); repeat for more, searched in order")
	f.StringVar(&verity, "verity", "", "verity mode: require, userspace or off")
	f.StringVar(&digest, "digest", "", "expected fs-verity digest of the image (64 hex characters)")
	f.BoolVar(&noexec, "noexec", false, "mount with noexec")
	f.BoolVar(&legacy, "legacy", false, "use the fallback path (loop device and mount(2)) even where the new mount API works")
	return cmd
}

func newImageUmountCmd() *cobra.Command {
	var lazy bool
	cmd := &cobra.Command{
		Use:   "umount [--lazy] MNT",
		Short: "Unmount a composefs mount (nothing mounted is not an error)",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return cfs.Unmount(args[0], lazy)
		},
	}
	cmd.Flags().BoolVar(&lazy, "lazy", false, "detach even while in use (MNT_DETACH)")
	return cmd
}

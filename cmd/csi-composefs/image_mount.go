package main

import (
	"fmt"
	"os"
	"path/filepath"

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
		Use:   "mount --objects DIR [--objects DIR]... [--verity MODE] [--digest HEX] IMG MNT",
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

The image is read and checked first (a truncated or corrupt image is refused,
as pull refuses it), and a warning goes to standard error when objects it
needs are in none of the --objects directories (those files would read EIO).

Prints how the image was mounted: the verity mode, the mount path taken and
the overlay source that identifies the mount in /proc/self/mountinfo.`,
		Args: exactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(objects) == 0 {
				return usageErrorf("at least one --objects DIR is required")
			}
			opts := cfs.MountOptions{ObjectDirs: objects, NoExec: noexec, ForceLegacy: legacy}
			if digest != "" {
				d, err := cfs.ParseUserDigest(digest)
				if err != nil {
					return usageErrorf("--digest: %v", err)
				}
				opts.ImageDigest = &d
				if verity == "" {
					verity = string(cfs.VerityUserspace)
				}
			}
			mode, err := cfs.ParseVerityMode(verity)
			if err != nil {
				return usageErrorf("--verity: %v", err)
			}
			opts.Verity = mode
			missing, total, first, err := checkImageForMount(args[0], objects)
			if err != nil {
				return err
			}
			if missing > 0 {
				fmt.Fprintf(cmd.ErrOrStderr(), "%s: warning: %d of %d objects the image needs are in none of the --objects directories (the first: %s); reading those files fails with EIO\n",
					cmd.CommandPath(), missing, total, first)
			}
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
	f.StringArrayVar(&objects, "objects", nil, "object directory (data-only lower layer), required; repeat for more, searched in order")
	_ = cmd.MarkFlagRequired("objects")
	f.StringVar(&verity, "verity", "", "verity mode: require, userspace or off")
	f.StringVar(&digest, "digest", "", "expected fs-verity digest of the image (64 hex characters)")
	f.BoolVar(&noexec, "noexec", false, "mount with noexec")
	f.BoolVar(&legacy, "legacy", false, "use the fallback path (loop device and mount(2)) even where the new mount API works")
	return cmd
}

// checkImageForMount reads the image with the strict reader, as pull does,
// and counts the objects it needs that are in none of dirs.
func checkImageForMount(image string, dirs []string) (missing, total int, first string, err error) {
	f, err := os.Open(image)
	if err != nil {
		return 0, 0, "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, 0, "", err
	}
	img, err := cfs.Open(f, fi.Size(), cfs.OpenOptions{})
	if err != nil {
		return 0, 0, "", fmt.Errorf("%s is not a valid composefs image (truncated or corrupt?), not mounting it: %w", image, err)
	}
	objs := img.Objects()
	for _, o := range objs {
		found := false
		for _, d := range dirs {
			if st, err := os.Stat(filepath.Join(d, o.Path)); err == nil && st.Mode().IsRegular() {
				found = true
				break
			}
		}
		if !found {
			if missing == 0 {
				first = o.Path
			}
			missing++
		}
	}
	return missing, len(objs), first, nil
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

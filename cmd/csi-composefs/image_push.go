package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
)

func newImagePushCmd() *cobra.Command {
	var (
		sf         sourceFlags
		rf         registryFlags
		objects    string
		base       string
		packSize   string
		minVersion int
		maxVersion int
		quiet      bool
	)
	cmd := &cobra.Command{
		Use:   "push [flags] SRC oci://REGISTRY/REPO:TAG",
		Short: "Push a composefs image and its objects to a registry as a composefs artifact",
		Long: `Push SRC (a directory, built as image build does, or a .cfs image with
--objects DIR) to a registry as a composefs artifact (docs/oci-artifact.md):
the EROFS image, an object index and tar "pack" layers of the objects. Only
the blobs the registry lacks are uploaded (HEAD first). The packs of the
artifact the tag names now (or of --base) that are still mostly needed are
reused, so a new version uploads mostly its new objects; with a --base in
another repository of the registry they are mounted from there.
Prints the manifest digest, then the composefs image digest (to pin in a
volume's digest attribute).`,
		Example: `  csi-composefs image push rootfs/ oci://registry.example.com/team/app:1.2
  csi-composefs image push --objects objects/ app.cfs oci://registry.example.com/team/app:1.2
  csi-composefs image push --insecure-registry localhost:5000 rootfs/ oci://localhost:5000/app:dev`,
		Args: exactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			src, target := args[0], args[1]
			if !strings.HasPrefix(target, oci.SchemeArtifact+"://") {
				return usageErrorf("the target must be oci://REGISTRY/REPO:TAG, got %q", target)
			}
			ref, err := oci.ParseReference(target)
			if err != nil {
				return usageError{err}
			}
			if ref.Digest != "" || ref.Tag == "" {
				return usageErrorf("the target must name a tag, not a digest")
			}
			size, err := parseSize(packSize)
			if err != nil || size < 1<<20 {
				return usageErrorf("--pack-size: want at least 1M")
			}
			o, err := rf.options(&sf)
			if err != nil {
				return err
			}
			c, err := oci.NewClient(ref, o)
			if err != nil {
				return usageError{err}
			}
			opts := oci.PushOptions{PackSize: size}
			if !quiet {
				opts.Log = func(format string, a ...any) { fmt.Fprintf(cmd.ErrOrStderr(), format+"\n", a...) }
			}
			if base != "" {
				b, err := oci.ParseReference(base)
				if err != nil || b.Scheme != oci.SchemeArtifact {
					return usageErrorf("--base: want oci://REGISTRY/REPO:TAG")
				}
				opts.Base = &b
			}
			fi, err := os.Stat(src)
			if err != nil {
				return err
			}
			var in oci.PushInput
			switch {
			case fi.IsDir():
				if objects != "" {
					return usageErrorf("--objects is for a .cfs SRC, not a directory")
				}
				in, err = oci.InputFromDir(ctx, src, cfs.DirOptions{}, cfs.WriteOptions{MinVersion: minVersion, MaxVersion: maxVersion})
			case objects == "":
				return usageErrorf("a .cfs SRC needs --objects DIR (its object store)")
			default:
				in, err = oci.InputFromImage(src, objects)
			}
			if err != nil {
				return err
			}
			res, err := oci.Push(ctx, c, in, opts)
			if err != nil {
				return err
			}
			if !quiet {
				fmt.Fprintf(cmd.ErrOrStderr(), "pushed %s: %d packs (%d reused), %d blobs uploaded (%s), %d present, %d mounted\n",
					ref, res.Packs, res.ReusedPacks, res.Uploaded, human(res.UploadedBytes), res.Present, res.Mounted)
			}
			fmt.Fprintln(cmd.OutOrStdout(), res.Manifest.Digest)
			fmt.Fprintln(cmd.OutOrStdout(), res.Digest)
			return nil
		},
	}
	fl := cmd.Flags()
	sf.addRegistryCredentials(cmd)
	rf.add(cmd, false)
	fl.StringVar(&objects, "objects", "", "object store of a .cfs SRC (xx/yyyy…)")
	fl.StringVar(&base, "base", "", "artifact whose packs may be reused (default: what the target tag names now)")
	fl.StringVar(&packSize, "pack-size", "64M", "size new packs are cut at")
	fl.IntVar(&minVersion, "min-version", 0, "lowest composefs format version to write (directory SRC)")
	fl.IntVar(&maxVersion, "max-version", 1, "highest composefs format version to write (directory SRC)")
	fl.BoolVarP(&quiet, "quiet", "q", false, "print only the digests")
	return cmd
}

package main

import (
	"bufio"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

type buildFlags struct {
	digestStore     string
	minVersion      int
	maxVersion      int
	printDigest     bool
	printDigestOnly bool
	fromFile        bool
	parseStrict     bool
	useEpoch        bool
	skipDevices     bool
	skipXattrs      bool
	userXattrs      bool
	threads         int
	repo            string
	name            string
	force           bool
	packs           bool
	packMaxObject   string
	packSize        string
	changed         map[string]bool // flags given
}

// packOptions are the packs --repo writes, nil with --packs=false.
func (f buildFlags) packOptions() (*fetch.PackOptions, error) {
	if !f.packs {
		return nil, nil
	}
	maxObj, err := parseSize(f.packMaxObject)
	if err != nil || maxObj < 1 {
		return nil, usageErrorf("--pack-max-object: want a size of at least 1 byte (like 1M or 256K), got %q", f.packMaxObject)
	}
	size, err := parseSize(f.packSize)
	if err != nil || size < 1<<20 {
		return nil, usageErrorf("--pack-size: want at least 1M, got %q", f.packSize)
	}
	return &fetch.PackOptions{MaxObject: maxObj, PackSize: size}, nil
}

func newImageBuildCmd() *cobra.Command {
	var f buildFlags
	cmd := &cobra.Command{
		Use:   "build [flags] SRC OUT.cfs | build --repo REPO --name NAME SRC",
		Short: "Build a composefs image from a directory or a dumpfile, like mkcomposefs",
		Long: `Build a composefs image from the directory SRC (or, with --from-file, from the
composefs dumpfile SRC; "-" reads standard input) and write it to OUT.cfs
("-" writes standard output). The output is byte-identical to mkcomposefs
1.0.8 for the same input and options, so its digest is the same.

From a directory, files of 1..64 bytes are stored inline and larger files
are referenced by their fs-verity digest; --digest-store copies them into an
object store laid out as xx/yyyy… (the layout volumes are served from).`,
		Example: `  csi-composefs image build --digest-store objects --print-digest rootfs/ app.cfs
  csi-composefs image build --from-file --print-digest app.dump app.cfs
  csi-composefs image build --repo /srv/repo --name app-1.2.cfs rootfs/   # publish to an HTTP repository`,
	}
	fl := cmd.Flags()
	fl.StringVar(&f.digestStore, "digest-store", "", "copy external files into this object store (directory input only)")
	fl.IntVar(&f.minVersion, "min-version", 0, "lowest composefs format version to write (0 or 1)")
	fl.IntVar(&f.maxVersion, "max-version", 1, "highest composefs format version to write (0 or 1); 1 is used only when the tree has whiteouts")
	fl.BoolVar(&f.printDigest, "print-digest", false, "print the image's fs-verity digest on standard output")
	fl.BoolVar(&f.printDigestOnly, "print-digest-only", false, "print the digest and write no image (OUT may be omitted)")
	fl.BoolVar(&f.fromFile, "from-file", false, "SRC is a composefs dumpfile, not a directory")
	fl.BoolVar(&f.parseStrict, "parse-strict", false, "parse the dumpfile strictly (as mkcomposefs does when "+cfs.ParseStrictEnv+" is set, which also turns this on): trailing newline, all 11 fields, symlink sizes, rdev 0 on non-devices")
	fl.BoolVar(&f.useEpoch, "use-epoch", false, "set every mtime to 0 (directory input)")
	fl.BoolVar(&f.skipDevices, "skip-devices", false, "leave out block and character devices (directory input)")
	fl.BoolVar(&f.skipXattrs, "skip-xattrs", false, "leave out all xattrs (directory input)")
	fl.BoolVar(&f.userXattrs, "user-xattrs", false, "keep only user.* xattrs (directory input)")
	fl.IntVar(&f.threads, "threads", 0, "files hashed in parallel (default: one per CPU); the output does not depend on it")
	fl.StringVar(&f.repo, "repo", "", "publish into this HTTP repository directory (REPO/images/NAME and REPO/objects/); takes SRC only and prints the digest")
	fl.StringVar(&f.name, "name", "", "image name in the repository, with --repo (for example app-1.2.cfs)")
	fl.BoolVar(&f.force, "force", false, "with --repo, replace an image of that name that has other content")
	fl.BoolVar(&f.packs, "packs", true, "with --repo, also pack the image's small objects into REPO/packs/ (reusing the packs the repository has) so that nodes fetch them with few range requests; --packs=false writes objects/ only")
	fl.StringVar(&f.packMaxObject, "pack-max-object", "1M", "with --repo, pack objects up to this size (larger ones are fetched each by its own request)")
	fl.StringVar(&f.packSize, "pack-size", "64M", "with --repo, size new packs are cut at")
	// With --print-digest-only the output argument is optional.
	cmd.Args = func(cmd *cobra.Command, args []string) error {
		if f.repo != "" {
			return exactArgs(1)(cmd, args)
		}
		if f.printDigestOnly {
			return rangeArgs(1, 2)(cmd, args)
		}
		return exactArgs(2)(cmd, args)
	}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		out := ""
		if len(args) == 2 {
			out = args[1]
		}
		f.changed = map[string]bool{}
		for _, name := range []string{"packs", "pack-max-object", "pack-size"} {
			f.changed[name] = cmd.Flags().Changed(name)
		}
		return runBuild(cmd, f, args[0], out)
	}
	return cmd
}

func (f buildFlags) validate(out string) error {
	for name, v := range map[string]int{"--min-version": f.minVersion, "--max-version": f.maxVersion} {
		if v < 0 || v > cfs.MaxFormatVersion {
			return usageErrorf("%s must be 0..%d, got %d", name, cfs.MaxFormatVersion, v)
		}
	}
	if f.parseStrict && !f.fromFile {
		return usageErrorf("--parse-strict applies to --from-file")
	}
	if f.fromFile && (f.digestStore != "" || f.useEpoch || f.skipDevices || f.skipXattrs || f.userXattrs) {
		return usageErrorf("--digest-store, --use-epoch, --skip-devices, --skip-xattrs and --user-xattrs apply to directory input, not --from-file")
	}
	if f.skipXattrs && f.userXattrs {
		return usageErrorf("--skip-xattrs and --user-xattrs exclude each other")
	}
	if (f.repo == "") != (f.name == "") {
		return usageErrorf("--repo and --name go together")
	}
	if f.force && f.repo == "" {
		return usageErrorf("--force goes with --repo")
	}
	for _, name := range []string{"packs", "pack-max-object", "pack-size"} {
		if f.changed[name] && f.repo == "" {
			return usageErrorf("--%s goes with --repo", name)
		}
	}
	if f.repo != "" && (f.fromFile || f.digestStore != "" || f.printDigestOnly) {
		return usageErrorf("--repo publishes a directory; it does not combine with --from-file, --digest-store or --print-digest-only")
	}
	if out == "-" && f.printDigest {
		return usageErrorf("--print-digest with OUT '-' would mix the digest into the image on standard output; write to a file or use --print-digest-only")
	}
	return nil
}

func runBuild(cmd *cobra.Command, f buildFlags, src, out string) error {
	if err := f.validate(out); err != nil {
		return err
	}
	ctx := cmd.Context()
	opts := cfs.WriteOptions{MinVersion: f.minVersion, MaxVersion: f.maxVersion}
	dirOpts := cfs.DirOptions{
		DigestStore: f.digestStore, UseEpoch: f.useEpoch, SkipDevices: f.skipDevices,
		SkipXattrs: f.skipXattrs, UserXattrs: f.userXattrs, Threads: f.threads,
	}
	if f.repo != "" {
		packs, err := f.packOptions()
		if err != nil {
			return err
		}
		d, err := buildIntoRepo(ctx, src, f.repo, f.name, f.force, packs, dirOpts, opts)
		if err != nil {
			return err
		}
		fmt.Fprintln(cmd.OutOrStdout(), d)
		return nil
	}
	var root *cfs.Node
	var err error
	if f.fromFile {
		var r io.Reader = cmd.InOrStdin()
		if src != "-" {
			file, err := os.Open(src)
			if err != nil {
				return err
			}
			defer file.Close()
			r = file
		}
		// Like mkcomposefs: strict when the variable is set, whatever its value.
		_, strictEnv := os.LookupEnv(cfs.ParseStrictEnv)
		root, err = cfs.ParseDump(bufio.NewReader(r), cfs.DumpOptions{Strict: f.parseStrict || strictEnv})
		if err != nil {
			return fmt.Errorf("%s: %w", src, err)
		}
	} else {
		root, err = cfs.BuildFromDir(ctx, src, dirOpts)
		if err != nil {
			return err
		}
	}
	var digest cfs.Digest
	switch {
	case f.printDigestOnly || out == "":
		digest, err = cfs.WriteImage(io.Discard, root, opts)
	case out == "-":
		stdout := cmd.OutOrStdout()
		if isTerminal(stdout) {
			return usageErrorf("standard output is a terminal; refusing to write an image to it")
		}
		digest, err = cfs.WriteImage(stdout, root, opts)
	default:
		digest, err = cfs.WriteImageFile(out, root, opts)
	}
	if err != nil {
		return err
	}
	if f.printDigest || f.printDigestOnly {
		fmt.Fprintln(cmd.OutOrStdout(), digest)
	}
	return nil
}

// isTerminal reports whether w is a terminal (a character device).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

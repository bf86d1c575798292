package main

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// inspectFlags are the flags shared by objects, dump and ls.
type inspectFlags struct {
	strict  bool
	filters []string
}

func (f *inspectFlags) register(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&f.strict, "strict", false,
		`refuse images whose redirects are not "/xx/"+62 hex digest paths matching their metacopy digest, or with files the kernel cannot read (composefs-info accepts both)`)
	cmd.Flags().StringArrayVar(&f.filters, "filter", nil,
		"only show this top-level entry of the image (repeatable), like composefs-info --filter")
}

func (f *inspectFlags) check() error {
	for _, name := range f.filters {
		if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
			return usageErrorf("--filter %q: want the name of a top-level entry", name)
		}
	}
	return nil
}

// openImageFile opens and validates the image at path.
func openImageFile(path string, strict bool) (*cfs.Image, error) {
	f, size, err := openRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	img, err := cfs.Open(f, size, inspectFlags{strict: strict}.openOptions())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return img, nil
}

// openOptions are the reader's options: composefs-info's leniency unless
// --strict.
func (f inspectFlags) openOptions() cfs.OpenOptions {
	return cfs.OpenOptions{AllowForeignRedirects: !f.strict, AllowUnreadableFiles: !f.strict}
}

// openRegular opens the regular file at path and returns its size.
func openRegular(path string) (*os.File, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, 0, fmt.Errorf("%s: not a regular file", path)
	}
	return f, st.Size(), nil
}

// filteredRoot returns the image root, limited to the --filter entries.
func (f *inspectFlags) filteredRoot(img *cfs.Image) *cfs.Node {
	root := img.Root()
	if len(f.filters) == 0 {
		return root
	}
	keep := make(map[string]bool, len(f.filters))
	for _, name := range f.filters {
		keep[name] = true
	}
	r := *root
	r.Children = nil
	for _, c := range root.Children {
		if keep[c.Name] {
			r.Children = append(r.Children, c)
		}
	}
	return &r
}

func newImageObjectsCmd() *cobra.Command {
	var f inspectFlags
	var basedir string
	cmd := &cobra.Command{
		Use:   "objects [flags] IMG...",
		Short: "List the backing objects the images need, like composefs-info objects",
		Long: `Print the backing objects (object-store paths "xx/yyyy…", one per line) that
the regular files of the composefs images IMG... reference, de-duplicated
over all images and sorted bytewise, as 'composefs-info objects' does.

With --basedir, print only the objects missing from that object store, as
'composefs-info missing-objects' does.`,
		Args: minArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := f.check(); err != nil {
				return err
			}
			if basedir != "" {
				if st, err := os.Stat(basedir); err != nil || !st.IsDir() {
					return usageErrorf("--basedir %s: not a directory", basedir)
				}
			}
			seen := make(map[string]bool)
			var paths []string
			for _, name := range args {
				img, err := openImageFile(name, f.strict)
				if err != nil {
					return err
				}
				err = f.filteredRoot(img).Walk(func(n *cfs.Node) error {
					if n.LinkTo == nil && n.Type() == cfs.ModeRegular && n.Payload != "" && !seen[n.Payload] {
						seen[n.Payload] = true
						paths = append(paths, n.Payload)
					}
					return nil
				})
				if err != nil {
					return err
				}
			}
			sort.Strings(paths) // byte order, as strcmp
			w := bufio.NewWriter(cmd.OutOrStdout())
			for _, p := range paths {
				if basedir != "" {
					present, err := objectPresent(basedir, p)
					if err != nil {
						return err
					}
					if present {
						continue
					}
				}
				fmt.Fprintln(w, p)
			}
			return w.Flush()
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&basedir, "basedir", "", "object store directory: list only the objects missing from it")
	return cmd
}

// objectPresent reports whether the object exists under basedir.
func objectPresent(basedir, object string) (bool, error) {
	_, err := os.Lstat(filepath.Join(basedir, strings.TrimLeft(object, "/")))
	if err == nil {
		return true, nil
	}
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		return false, nil
	}
	return false, err
}

func newImageDumpCmd() *cobra.Command {
	var f inspectFlags
	cmd := &cobra.Command{
		Use:   "dump [flags] IMG",
		Short: "Print a composefs image as a dumpfile, like composefs-info dump",
		Long: `Print the composefs image IMG as a composefs dumpfile (one line per path:
PATH SIZE MODE NLINK UID GID RDEV MTIME PAYLOAD CONTENT DIGEST XATTR...),
byte-for-byte as 'composefs-info dump' prints it, except that a redirect is
turned into a payload by stripping exactly one leading '/' (composefs-info
may append stray bytes to some payloads) and that an xattr of an empty name
after its prefix and an empty value is shown where it ends an inode's
inline xattrs (composefs-info misses it). The output can be fed back to
'image build --from-file'. The image is checked first: nothing is printed
for an image that is refused. With --filter, hardlinks are shown as among
the entries kept, as composefs-info does.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := f.check(); err != nil {
				return err
			}
			// Streamed: the image is checked as openImageFile checks it,
			// then written without building its tree.
			file, size, err := openRegular(args[0])
			if err != nil {
				return err
			}
			defer file.Close()
			if err := cfs.DumpImage(cmd.OutOrStdout(), file, size, f.openOptions(), f.filters...); err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func newImageLsCmd() *cobra.Command {
	var f inspectFlags
	cmd := &cobra.Command{
		Use:   "ls [flags] IMG [PATH]",
		Short: "List the entries of a composefs image, like composefs-info ls",
		Long: `List the entries of the composefs image IMG below PATH (default: the root),
depth first in bytewise name order, one per line as 'composefs-info ls'
prints them:

  /dir/<TAB>                       a directory
  /link<TAB>-> target              a symlink
  /file<TAB>@ xx/yyyy…             a regular file backed by an object
  /other                           anything else (inline files, devices,
                                   whiteouts, hardlinks to an earlier path)

If PATH is not a directory, only its own line is printed.`,
		Args: rangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := f.check(); err != nil {
				return err
			}
			img, err := openImageFile(args[0], f.strict)
			if err != nil {
				return err
			}
			root := f.filteredRoot(img)
			if len(args) == 1 {
				return cfs.WriteList(cmd.OutOrStdout(), root, "")
			}
			p := args[1]
			if !strings.HasPrefix(p, "/") {
				p = "/" + p
			}
			n := root.Lookup(p)
			if n == nil {
				return fmt.Errorf("%s: %s: %w", args[0], args[1], fs.ErrNotExist)
			}
			return cfs.WriteList(cmd.OutOrStdout(), n, strings.TrimSuffix(n.Path(), "/"))
		},
	}
	f.register(cmd)
	return cmd
}

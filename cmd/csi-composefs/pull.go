package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/csi-composefs/csi-composefs/cmd/csi-composefs/app"
	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
)

// sourceFlags are the flags that build an HTTP source.
type sourceFlags struct {
	repository   string
	caFile       string
	username     string
	passwordFile string
	tokenFile    string
}

func (f *sourceFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.repository, "repository", "", "base URL of the HTTP repository (REPO/images/NAME, REPO/objects/xx/yyyy…)")
	cmd.Flags().StringVar(&f.caFile, "ca-file", "", "PEM bundle of extra trusted CAs")
	cmd.Flags().StringVar(&f.username, "username", "", "basic auth user")
	cmd.Flags().StringVar(&f.passwordFile, "password-file", "", "file holding the basic auth password")
	cmd.Flags().StringVar(&f.tokenFile, "token-file", "", "file holding a bearer token")
}

func (f *sourceFlags) source() (*fetch.HTTPSource, error) {
	if f.repository == "" {
		return nil, usageErrorf("--repository is required")
	}
	opts := fetch.HTTPOptions{CAFile: f.caFile, Username: f.username}
	if f.passwordFile != "" {
		b, err := os.ReadFile(f.passwordFile)
		if err != nil {
			return nil, fmt.Errorf("reading the password: %w", err)
		}
		opts.Password = strings.TrimRight(string(b), "\r\n")
	}
	if f.tokenFile != "" {
		b, err := os.ReadFile(f.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("reading the token: %w", err)
		}
		opts.BearerToken = strings.TrimSpace(string(b))
	}
	src, err := fetch.NewHTTPSource(f.repository, opts)
	if err != nil {
		return nil, usageError{err}
	}
	return src, nil
}

// storeFlags are the flags that open a store. Every command names a thing
// the same way: --store-dir, --extra-object-dir, --fetch-concurrency,
// --store-max-size, --max-image-size (serve too).
type storeFlags struct {
	dir          string
	extra        []string
	concurrency  int
	maxImageSize string
	parseMemory  string
	maxSize      string
	retries      int
	named        bool
	nonCanonical bool
}

// addDir adds --store-dir.
func (f *storeFlags) addDir(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.dir, "store-dir", fetch.DefaultStoreDir, "the node store directory")
}

// addFetch adds the flags of a command that fetches into the store.
func (f *storeFlags) addFetch(cmd *cobra.Command) {
	cmd.Flags().StringArrayVar(&f.extra, "extra-object-dir", nil, "read-only object directory whose objects need not be fetched (repeatable)")
	cmd.Flags().IntVar(&f.concurrency, "fetch-concurrency", 256, "most concurrent object downloads (from 16, doubling while the throughput grows)")
	cmd.Flags().StringVar(&f.maxImageSize, "max-image-size", "128M", "largest image accepted (bytes, or with K/M/G/T); parsing and checking an image takes 3 to 32 times its size in memory")
	cmd.Flags().StringVar(&f.parseMemory, "parse-memory", "256M", "memory the image's parse and canonical check may take (bytes, or with K/M/G/T; 0 = none): an image whose tree would take more is refused")
	cmd.Flags().IntVar(&f.retries, "retries", 5, "retries of a transient failure (0 = none)")
	cmd.Flags().BoolVar(&f.nonCanonical, "allow-noncanonical-images", false, "accept images whose bytes are not what this project's writer makes of their tree (other writers than mkcomposefs 1.0.8, composefs-rs V1 and csi-composefs)")
	cmd.Flags().BoolVar(&f.named, "named-temp-files", false, "download objects into named files under tmp/ even where O_TMPFILE works (tests)")
	_ = cmd.Flags().MarkHidden("named-temp-files")
}

// addMaxSize adds --store-max-size.
func (f *storeFlags) addMaxSize(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.maxSize, "store-max-size", "0", "size budget of the store for GC (bytes, or with K/M/G/T; 0 = none)")
}

func (f *storeFlags) options() (fetch.Options, error) {
	var o fetch.Options
	o.ExtraObjectDirs = f.extra
	o.Parallelism = f.concurrency
	o.NamedTempFiles = f.named
	o.AllowNonCanonicalImages = f.nonCanonical
	if f.concurrency < 0 {
		return o, usageErrorf("--fetch-concurrency must be positive")
	}
	o.Retries = f.retries
	if f.retries == 0 {
		o.Retries = -1
	}
	var err error
	if f.maxImageSize != "" {
		if o.MaxImageSize, err = parseSize(f.maxImageSize); err != nil {
			return o, usageErrorf("--max-image-size: %v", err)
		}
	}
	if f.parseMemory != "" {
		if o.ParseMemory, err = parseSize(f.parseMemory); err != nil {
			return o, usageErrorf("--parse-memory: %v", err)
		}
		if o.ParseMemory == 0 {
			o.ParseMemory = -1 // none
		}
	}
	if f.maxSize == "" {
		return o, nil
	}
	if o.MaxSize, err = parseSize(f.maxSize); err != nil {
		return o, usageErrorf("--store-max-size: %v", err)
	}
	return o, nil
}

// openExisting opens the store of --store-dir, refusing a directory that
// is not a store yet (a usage error: the path is wrong).
func (f *storeFlags) openExisting(ctx context.Context, opts fetch.Options) (*fetch.Store, error) {
	opts.MustExist = true
	s, err := fetch.Open(ctx, f.dir, opts)
	if errors.Is(err, fetch.ErrNotAStore) {
		return nil, usageErrorf("--store-dir: %v", err)
	}
	return s, err
}

// parseSize parses "123", "10K", "512M", "1G", "2T" (powers of 1024).
func parseSize(s string) (int64, error) { return app.ParseSize(s) }

func newPullCmd() *cobra.Command {
	var (
		sf     sourceFlags
		rf     registryFlags
		stf    storeFlags
		digest string
		bar    string
	)
	cmd := &cobra.Command{
		Use:   "pull (--repository URL NAME | oci://REGISTRY/REPO:TAG | docker://REGISTRY/REPO:TAG) [--store-dir DIR] [--digest D]",
		Short: "Fetch an image and the objects the store lacks into the node store",
		Long: `Fetch the composefs image NAME from an HTTP repository into the node store,
then every object it references that the store (or an --extra-object-dir
directory) does not have yet, verifying each against its fs-verity digest.
An oci:// reference names a composefs artifact in a registry (its objects
are fetched by range from its packs); a docker:// reference a container
image, converted into a composefs image in the store.
With --digest, an image of another digest is refused, and an image already in
the store is used without asking the repository. Prints the image digest.
A progress bar is shown on a terminal, plain progress lines otherwise.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			ref := fetch.ImageRef{Name: args[0]}
			if digest != "" {
				d, err := cfs.ParseUserDigest(digest)
				if err != nil {
					return usageErrorf("--digest: %v", err)
				}
				ref.Digest = d
			}
			var src fetch.Source
			if isRegistryRef(args[0]) {
				if sf.repository != "" {
					return usageErrorf("--repository is not used with an %s reference", args[0][:strings.Index(args[0], ":")])
				}
				r, err := oci.ParseReference(args[0])
				if err != nil {
					return usageError{err}
				}
				o, err := rf.options(&sf)
				if err != nil {
					return err
				}
				rs, err := oci.NewRepoSource(r, o)
				if err != nil {
					return usageError{err}
				}
				ref.Name = r.Name()
				if src, err = rs.BindRef(ref); err != nil {
					return usageError{err}
				}
			} else {
				if err := fetch.ValidImageName(ref.Name); err != nil {
					return usageError{err}
				}
				var err error
				if src, err = sf.source(); err != nil {
					return err
				}
			}
			opts, err := stf.options()
			if err != nil {
				return err
			}
			mode, err := progressMode(bar, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			return pull(ctx, cmd.OutOrStdout(), cmd.ErrOrStderr(), src, stf.dir, opts, ref, mode)
		},
	}
	sf.add(cmd)
	rf.add(cmd, true)
	stf.addDir(cmd)
	stf.addFetch(cmd)
	cmd.Flags().StringVar(&digest, "digest", "", "expected fs-verity digest of the image (64 hex)")
	cmd.Flags().StringVar(&bar, "progress", "auto", "progress display: auto (bar on a terminal), bar, plain, none")
	return cmd
}

type progressKind int

const (
	progressNone progressKind = iota
	progressPlain
	progressBar
)

func progressMode(s string, w io.Writer) (progressKind, error) {
	switch s {
	case "auto":
		if f, ok := w.(*os.File); ok {
			if _, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS); err == nil {
				return progressBar, nil
			}
		}
		return progressPlain, nil
	case "bar":
		return progressBar, nil
	case "plain":
		return progressPlain, nil
	case "none":
		return progressNone, nil
	}
	return 0, usageErrorf("--progress: want auto, bar, plain or none, got %q", s)
}

func pull(ctx context.Context, stdout, stderr io.Writer, src fetch.Source, dir string, opts fetch.Options, ref fetch.ImageRef, mode progressKind) error {
	s, err := fetch.Open(ctx, dir, opts)
	if err != nil {
		return err
	}
	defer s.Close()
	start := time.Now()
	// A container image is converted while its layers come: that is where
	// its bytes are, so its progress is shown first.
	var conv fetch.Progress
	var d cfs.Digest
	if _, ok := src.(fetch.ImageBuilder); ok {
		err = withProgress(stderr, &conv, mode, start, func() error {
			d, err = s.EnsureImage(ctx, src, ref, fetch.WithProgress(&conv))
			return err
		})
	} else {
		d, err = s.EnsureImage(ctx, src, ref)
	}
	if err != nil {
		return err
	}
	limitObjectsMemory()
	var p fetch.Progress
	var st fetch.Stats
	err = withProgress(stderr, &p, mode, start, func() error {
		st, err = s.EnsureObjects(ctx, src, d, fetch.WithProgress(&p))
		return err
	})
	if err != nil {
		return err
	}
	el := time.Since(start)
	if mode != progressNone {
		if conv.FetchBytes.Load() > 0 {
			fmt.Fprintf(stderr, "converted %s: %s of layers, %d objects written\n", ref, human(conv.Fetched.Load()), conv.DoneObjects.Load())
		}
		fmt.Fprintf(stderr, "pulled %s: %d objects (%s), fetched %d (%s) in %s, %s already on the node\n",
			ref, st.Objects, human(int64(st.Bytes)), st.Fetched, human(int64(st.FetchedBytes)),
			el.Round(time.Millisecond), human(int64(st.SavedBytes())))
	}
	fmt.Fprintln(stdout, d)
	return nil
}

// withProgress runs f while showing p.
func withProgress(w io.Writer, p *fetch.Progress, mode progressKind, start time.Time, f func() error) error {
	stop := make(chan struct{})
	shown := make(chan struct{})
	go func() {
		defer close(shown)
		showProgress(w, p, mode, start, stop)
	}()
	err := f()
	close(stop)
	<-shown
	return err
}

func showProgress(w io.Writer, p *fetch.Progress, mode progressKind, start time.Time, stop <-chan struct{}) {
	if mode == progressNone {
		<-stop
		return
	}
	every := 5 * time.Second
	if mode == progressBar {
		every = 200 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	line := func() string {
		done, total := p.DoneObjects.Load(), p.Objects.Load()
		got, want := p.Fetched.Load(), p.FetchBytes.Load()
		el := time.Since(start).Seconds()
		rate := float64(got) / max(el, 0.001)
		eta := "--:--"
		if rate > 0 && want > got {
			eta = time.Duration(float64(want-got) / rate * float64(time.Second)).Round(time.Second).String()
		}
		return fmt.Sprintf("%d/%d objects  %s/%s  %s/s  ETA %s",
			done, total, human(got), human(want), human(int64(rate)), eta)
	}
	for {
		select {
		case <-stop:
			if mode == progressBar {
				fmt.Fprintf(w, "\r\033[K%s\n", line())
			}
			return
		case <-t.C:
			if mode == progressBar {
				total := max(p.FetchBytes.Load(), 1)
				const width = 30
				n := int(min(p.Fetched.Load()*width/total, width))
				fmt.Fprintf(w, "\r\033[K[%s%s] %s", strings.Repeat("#", n), strings.Repeat(" ", width-n), line())
			} else {
				fmt.Fprintln(w, line())
			}
		}
	}
}

func human(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

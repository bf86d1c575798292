// Package reftools finds the reference material the differential tests and
// benchmarks compare against: the C composefs tools (mkcomposefs,
// composefs-info, mount.composefs 1.0.8, fsck.erofs), installed on demand by
// hack/c-tools.sh into a cache folder outside the repository, and the C
// project's own test assets, read from the shared folder beside the
// repository. Tests skip, saying why, when either cannot be had.
package reftools

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Environment variables that point at the material explicitly.
const (
	// CToolsEnv names a folder holding mkcomposefs, composefs-info,
	// mount.composefs and fsck.erofs (wrappers or binaries); when set,
	// nothing is installed.
	CToolsEnv = "CFS_C_TOOLS"
	// UpstreamEnv names the folder of composefs's tests/assets.
	UpstreamEnv = "CFS_UPSTREAM_TESTDATA"
)

// CTools are the reference C tools.
type CTools struct {
	Dir string // folder of the executables
}

// Path returns the path of the tool called name.
func (c *CTools) Path(name string) string { return filepath.Join(c.Dir, name) }

// Command returns an exec.Cmd running the tool name with args.
func (c *CTools) Command(name string, args ...string) *exec.Cmd {
	return exec.Command(c.Path(name), args...)
}

// Run runs the tool name with args and stdin, returning its standard
// output; a non-zero exit is an error carrying its standard error.
func (c *CTools) Run(stdin []byte, name string, args ...string) ([]byte, error) {
	cmd := c.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("%s %v: %w: %s", name, args, err, bytes.TrimSpace(errOut.Bytes()))
	}
	return out.Bytes(), nil
}

var (
	ctoolsOnce sync.Once
	ctools     *CTools
	ctoolsErr  error
)

// errCannotFetch marks an install that failed because the packages could
// not be fetched (exit status 2 of hack/c-tools.sh).
var errCannotFetch = errors.New("the Debian packages of the C composefs tools cannot be fetched")

// FindCTools returns the C tools, installing them on first use in this
// process (hack/c-tools.sh takes a lock, so concurrent test binaries share
// one install).
func FindCTools() (*CTools, error) {
	ctoolsOnce.Do(func() {
		if d := os.Getenv(CToolsEnv); d != "" {
			ctools = &CTools{Dir: d}
			if _, err := os.Stat(ctools.Path("mkcomposefs")); err != nil {
				ctools, ctoolsErr = nil, fmt.Errorf("%s=%s: %w", CToolsEnv, d, err)
			}
			return
		}
		root, err := RepoRoot()
		if err != nil {
			ctoolsErr = err
			return
		}
		cmd := exec.Command(filepath.Join(root, "hack", "c-tools.sh"))
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err = cmd.Run()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee) && ee.ExitCode() == 2:
			ctoolsErr = fmt.Errorf("%w: %s", errCannotFetch, bytes.TrimSpace(errOut.Bytes()))
		case err != nil:
			ctoolsErr = fmt.Errorf("hack/c-tools.sh: %w: %s", err, bytes.TrimSpace(errOut.Bytes()))
		default:
			ctools = &CTools{Dir: string(bytes.TrimSpace(out.Bytes()))}
		}
	})
	return ctools, ctoolsErr
}

// Unavailable skips the test because something it needs cannot be had on
// this machine, except under CI (CI=true, as .ci/run sets): CI installs what
// the tests need, and a skipped proof there would pass unseen, so it fails.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s (CI=true: a test that cannot run fails instead of skipping)", msg)
	}
	t.Skipf("skipping: %s", msg)
}

// RequireCTools returns the C tools or skips the test when their packages
// cannot be fetched; any other install failure fails the test.
func RequireCTools(t testing.TB) *CTools {
	t.Helper()
	c, err := FindCTools()
	if errors.Is(err, errCannotFetch) {
		Unavailable(t, "no reference C tools: %v", err)
	}
	if err != nil {
		t.Fatalf("installing the reference C tools: %v", err)
	}
	return c
}

// RepoRoot returns the root of the repository holding the working
// directory (the folder with this module's go.mod).
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(b, []byte("module github.com/csi-composefs/csi-composefs\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("not inside the csi-composefs repository")
		}
		dir = parent
	}
}

// UpstreamAssets returns the folder of composefs's own test assets:
// $CFS_UPSTREAM_TESTDATA, else ../shared/testdata/composefs-upstream from
// the repository root. The test skips when neither exists.
func UpstreamAssets(t testing.TB) string {
	t.Helper()
	dir := os.Getenv(UpstreamEnv)
	if dir == "" {
		root, err := RepoRoot()
		if err != nil {
			t.Fatal(err)
		}
		dir = filepath.Join(root, "..", "shared", "testdata", "composefs-upstream")
	}
	if _, err := os.Stat(filepath.Join(dir, "special.dump")); err != nil {
		t.Skipf("skipping: composefs's upstream test assets are not at %s (set %s to their folder): %v", dir, UpstreamEnv, err)
	}
	return dir
}

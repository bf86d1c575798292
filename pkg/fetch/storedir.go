package fetch

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// ErrNotAStore: a directory that is not a store was named where one must
// exist already.
var ErrNotAStore = errors.New("not a csi-composefs store")

// CheckStoreDir reports whether root is a store: a directory holding the
// lock file and the objects/ and images/ directories that Open creates.
// (An HTTP repository also has objects/ and images/, but no lock file.)
// Commands that only maintain a store (gc, verify, du) check it, so that a
// mistyped path is refused instead of becoming a new, empty store.
func CheckStoreDir(root string) error {
	fi, err := os.Stat(root)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("store %s: no such directory (only pull and serve create a store): %w", root, ErrNotAStore)
	}
	if err != nil {
		return fmt.Errorf("store %s: %w", root, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("store %s: not a directory: %w", root, ErrNotAStore)
	}
	for _, p := range []struct {
		name string
		dir  bool
	}{{lockFile, false}, {objectsDir, true}, {imagesDir, true}} {
		fi, err := os.Lstat(filepath.Join(root, p.name))
		if err != nil || fi.IsDir() != p.dir || (!p.dir && !fi.Mode().IsRegular()) {
			return fmt.Errorf("store %s: no %s (only pull and serve create a store): %w", root, p.name, ErrNotAStore)
		}
	}
	return nil
}

package cfs

import (
	"errors"
	"fmt"
	"os"
	"strings"
)

// ErrInvalidSELinuxContext: a context= value that is not an SELinux
// security context.
var ErrInvalidSELinuxContext = errors.New("invalid SELinux context")

// maxSELinuxContext bounds a context= value (real ones are a few dozen
// bytes; the kernel copies mount data from one page).
const maxSELinuxContext = 255

// CheckSELinuxContext validates the value of a context= mount option: an
// SELinux security context user:role:type[:level], e.g.
// system_u:object_r:container_file_t:s0:c15,c25 (what the kubelet passes
// with seLinuxMount). Only letters, digits and _ . - : , are allowed, so the
// value cannot close the quotes it is put in or add another mount option.
func CheckSELinuxContext(c string) error {
	if c == "" || len(c) > maxSELinuxContext {
		return fmt.Errorf("%w: %q: want 1 to %d bytes", ErrInvalidSELinuxContext, c, maxSELinuxContext)
	}
	for _, r := range c {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("_.-:,", r)) {
			return fmt.Errorf("%w: %q: character %q (want user:role:type[:level])", ErrInvalidSELinuxContext, c, r)
		}
	}
	parts := strings.SplitN(c, ":", 4)
	if len(parts) < 3 {
		return fmt.Errorf("%w: %q: want user:role:type[:level]", ErrInvalidSELinuxContext, c)
	}
	for i, p := range parts[:3] {
		if p == "" || strings.Contains(p, ",") {
			return fmt.Errorf("%w: %q: field %d (of user:role:type) is empty or holds a comma", ErrInvalidSELinuxContext, c, i+1)
		}
	}
	if len(parts) == 4 && parts[3] == "" {
		return fmt.Errorf("%w: %q: empty level", ErrInvalidSELinuxContext, c)
	}
	return nil
}

// SELinuxEnabled reports whether the running kernel enforces SELinux
// policy (enforcing or permissive): the kernel registers selinuxfs only
// when SELinux is enabled, which /proc/filesystems shows even inside a
// container; /sys/fs/selinux/enforce is checked too.
func SELinuxEnabled() bool {
	if data, err := os.ReadFile("/proc/filesystems"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) > 0 && f[len(f)-1] == "selinuxfs" {
				return true
			}
		}
	}
	_, err := os.Stat("/sys/fs/selinux/enforce")
	return err == nil
}

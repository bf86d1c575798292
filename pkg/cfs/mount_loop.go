package cfs

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// attachLoop binds img to a free loop device, read-only with direct I/O and
// autoclear, so that the device goes away when its last user (the erofs
// superblock) lets go of it. The caller closes the returned file once the
// device is in use, or to free it at once.
func attachLoop(img *os.File) (*os.File, string, error) {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, "", fmt.Errorf("setting up a loop device: %w", err)
	}
	defer ctl.Close()
	var lastErr error
	// Another process may take the free device between the two calls.
	for range 32 {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, "", fmt.Errorf("setting up a loop device: LOOP_CTL_GET_FREE: %w", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		f, err := os.OpenFile(dev, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				lastErr = err
				continue
			}
			return nil, "", fmt.Errorf("setting up a loop device: %w", err)
		}
		cfg := unix.LoopConfig{Fd: uint32(img.Fd()), Size: VerityBlockSize}
		cfg.Info.Flags = unix.LO_FLAGS_READ_ONLY | unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_DIRECT_IO
		copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], img.Name())
		err = unix.IoctlLoopConfigure(int(f.Fd()), &cfg)
		if err == nil {
			return f, dev, nil
		}
		f.Close()
		if !errors.Is(err, unix.EBUSY) {
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY) {
				return nil, "", fmt.Errorf("setting up %s: LOOP_CONFIGURE (needs ≥ 5.8): %w", dev, err)
			}
			return nil, "", fmt.Errorf("setting up %s: LOOP_CONFIGURE: %w", dev, err)
		}
		lastErr = err
	}
	return nil, "", fmt.Errorf("setting up a loop device: no free device after retries: %w", lastErr)
}

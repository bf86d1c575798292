package vm

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestVMVerity boots Debian's 6.12 kernel (fs-verity built in) with the
// store on an ext4 disk made with -O verity, and there: publishes a volume
// through the driver with --min-verity=require; checks that every stored
// file's kernel-measured digest is its name and its userspace digest; reads
// every file through the verity=require mount; shows that an object
// replaced by other content (with fs-verity) and an object with a block
// overwritten on the raw device both fail with EIO while every other file
// reads; and that an image whose digest is not the pinned one (another
// image's digest asked for, or the stored image replaced) is refused
// before anything is mounted. See guest_verity_test.go.
func TestVMVerity(t *testing.T) {
	d := needVM(t)
	initrd := guestInitramfs(t, d)
	disk := newDisk(t, 256<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	v := bootGuest(t, ctx, d, initrd, vmConfig{drives: []string{"file=" + disk + ",format=raw,if=virtio,cache=writeback"},
		env: map[string]string{guestEnv: "verity"}}, nil)
	err := v.wait(ctx)
	t.Logf("VM ran %s", time.Since(v.start).Round(100*time.Millisecond))
	reportGuest(t, v, err)
}

// reportGuest fails the test unless the guest's test passed; it logs the
// guest's steps.
func reportGuest(t *testing.T, v *vm, err error) {
	t.Helper()
	for _, l := range v.guestLines("STEP") {
		t.Log(l)
	}
	exit := v.guestLines("EXIT")
	out := v.console()
	if err != nil || len(exit) != 1 || exit[0] != "EXIT 0" || !strings.Contains(out, "--- PASS: TestGuest") {
		t.Fatalf("the guest's test did not pass (QEMU: %v, %v); console:\n%s", err, exit, lastLines(out, 150))
	}
}

// powerCutEnv set to 1 runs TestVMPowerCut.
const powerCutEnv = "CSI_COMPOSEFS_VM_POWERCUT"

// TestVMPowerCut cuts the power of a VM pulling into a store on its disk,
// 20 times at random moments, and after each cut starts again (resuming a
// state saved once, after boot, before the guest touched its disk: the
// kernel's cache of the disk is dropped before it is mounted) and checks
// that every file under objects/ and images/ has the digest it is named by
// (as read and, in the store with fs-verity, as the kernel measures it),
// that tmp/ is cleared at open, and at the end that a pull completes. The
// boots alternate between two stores on the disk, one with fs-verity and
// one without, and between anonymous and named temporary files. The disk is a volatile write cache
// in front of the image (volatileDisk): what the store did not flush is
// lost for real. CSI_COMPOSEFS_POWERCUT_SEED replays a run (the seed is
// printed); CSI_COMPOSEFS_POWERCUTS sets the number of cuts;
// CSI_COMPOSEFS_VM_UNSAFE_NOSYNC=1 runs the store without any sync, which
// must make the test fail.
//
// It takes about 3 minutes, so it runs only when powerCutEnv is 1 (make
// vm-test), not in make test.
func TestVMPowerCut(t *testing.T) {
	if os.Getenv(powerCutEnv) != "1" {
		t.Skipf("the power-cut test (about 3 minutes) runs with make vm-test, or %s=1", powerCutEnv)
	}
	d := needVM(t)
	initrd := guestInitramfs(t, d)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CSI_COMPOSEFS_POWERCUT_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("CSI_COMPOSEFS_POWERCUT_SEED: %v", err)
		}
	}
	cuts := 20
	if s := os.Getenv("CSI_COMPOSEFS_POWERCUTS"); s != "" {
		var err error
		if cuts, err = strconv.Atoi(s); err != nil || cuts < 1 {
			t.Fatalf("CSI_COMPOSEFS_POWERCUTS: %q", s)
		}
	}
	noSync := os.Getenv(noSyncEnv) == "1"
	t.Logf("seed %d (CSI_COMPOSEFS_POWERCUT_SEED=%d replays the cut times), %d cuts, store sync off: %v", seed, seed, cuts, noSync)
	rng := rand.New(rand.NewPCG(seed, 1))

	img := newDisk(t, 256<<20)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	disk, err := newVolatileDisk(img, sock, rand.New(rand.NewPCG(seed, 2)))
	if err != nil {
		t.Fatal(err)
	}
	defer disk.close()
	drive := "file=nbd+unix:///?socket=" + sock + ",format=raw,if=virtio,cache=writeback"
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()

	// Boot once, up to the guest's READY (before it touches its disk), and
	// save that state: every run resumes it instead of booting.
	dir := t.TempDir()
	state := filepath.Join(dir, "vm.state")
	cfg := vmConfig{drives: []string{drive}, env: map[string]string{guestEnv: "powercut"}}
	prepCfg := cfg
	prepCfg.qmp = filepath.Join(dir, "qmp.sock")
	prep := bootGuest(t, ctx, d, initrd, prepCfg, func() { <-disk.ended })
	if _, _, err := prep.waitFor(ctx, 0, "READY"); err != nil {
		t.Fatalf("preparing the VM: %v; console:\n%s", err, lastLines(prep.console(), 60))
	}
	saveStart := time.Now()
	if err := prep.saveState(ctx, state); err != nil {
		t.Fatalf("saving the VM's state: %v", err)
	}
	<-disk.ended
	fi, _ := os.Stat(state)
	t.Logf("booted and set up in %s; state saved in %s (%d MB)", saveStart.Sub(prep.start).Round(100*time.Millisecond),
		time.Since(saveStart).Round(100*time.Millisecond), fi.Size()>>20)
	cfg.incoming = state
	command := func(mode string, boot int) string {
		c := fmt.Sprintf("RUN %s %d", mode, boot)
		if noSync {
			c += " nosync"
		}
		return c
	}
	resume := func(mode string, boot int) *vm {
		v := bootVM(t, d, initrd, cfg)
		// Type the command until the guest says it started: the console
		// drops what it gets while the VM is still resuming.
		for {
			if err := v.send(command(mode, boot)); err != nil {
				t.Fatal(err)
			}
			sctx, scancel := context.WithTimeout(ctx, time.Second)
			_, _, err := v.waitFor(sctx, 0, "STARTED")
			scancel()
			if err == nil {
				return v
			}
			if ctx.Err() != nil || v.exited() {
				t.Fatalf("run %d: the guest did not start (%v); console:\n%s", boot, err, lastLines(v.console(), 40))
			}
		}
	}
	var failures []string
	checkBoot := func(v *vm, boot int) {
		for _, l := range v.guestLines("CHECK") {
			if strings.HasPrefix(l, "CHECK-FAIL") {
				failures = append(failures, fmt.Sprintf("boot %d: %s", boot, l))
			}
		}
	}
	var pulled, collected int
	var prev diskStats
	for boot := 0; boot < cuts; boot++ {
		v := resume("powercut", boot)
		pulling, _, err := v.waitFor(ctx, 0, "PULLING")
		if err != nil {
			checkBoot(v, boot)
			t.Fatalf("boot %d: %v; failures %q; console:\n%s", boot, err, failures, lastLines(v.console(), 80))
		}
		line := strings.Join(append(v.guestLines("CHECK "), pulling), "; ")
		pullStart := time.Now()
		// The cut comes during the pulls and collections, anywhere in
		// the first rounds.
		delay := time.Duration(rng.Int64N(int64(5 * time.Second)))
		select {
		case <-time.After(delay):
		case <-v.done:
		}
		v.kill()
		select {
		case <-disk.ended:
		case <-time.After(time.Minute):
			t.Fatal("the disk did not see QEMU's connection end")
		}
		checkBoot(v, boot)
		rounds := v.guestLines("ROUND")
		pulled += strings.Count(strings.Join(rounds, "\n"), "pulled")
		collected += strings.Count(strings.Join(rounds, "\n"), "collected")
		now := disk.snapshot()
		t.Logf("run %d (%s in all): %s; cut %s into the pulls (%d rounds done); %d writes, %d flushes; the cut lost %d cached pages, kept %d",
			boot, time.Since(v.start).Round(100*time.Millisecond), line, time.Since(pullStart).Round(10*time.Millisecond), len(rounds),
			now.Writes-prev.Writes, now.Flushes-prev.Flushes, now.PagesLost-prev.PagesLost, now.PagesKept-prev.PagesKept)
		prev = now
	}
	v := resume("final", cuts)
	err = v.wait(ctx)
	<-disk.ended
	checkBoot(v, cuts)
	for _, l := range v.guestLines("CHECK") {
		t.Log(l)
	}
	st := disk.snapshot()
	t.Logf("%d power cuts: %d pages lost and %d kept from the disk cache; %d flushes; pulls completed: %d, collections: %d",
		st.Cuts, st.PagesLost, st.PagesKept, st.Flushes, pulled, collected)
	if len(failures) > 0 {
		t.Errorf("after a power cut the store had files that are not what their names say (seed %d):\n%s", seed, strings.Join(failures, "\n"))
	}
	if st.Flushes == 0 || st.PagesLost == 0 {
		t.Errorf("the disk cache never flushed (%d) or never lost a page (%d): the cuts tested nothing", st.Flushes, st.PagesLost)
	}
	reportGuest(t, v, err)
	if len(v.guestLines("FINAL")) != 1 {
		t.Error("the last pull did not complete")
	}
}

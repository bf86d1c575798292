// Package vm runs the store, the driver and the mount sequence on a real
// kernel with fs-verity: Debian's 6.12 kernel booted under QEMU (software
// emulation, no KVM needed) with a busybox initramfs. The host side
// (TestVM*) fetches the kernel and QEMU (hack/vm-deps.sh), builds this
// package's own test binary statically, boots it as the guest's test
// program, and reads its verdict from the serial console; the guest side
// (TestGuest) runs only inside the VM.
package vm

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/csi-composefs/csi-composefs/internal/reftools"
)

// guestEnv names the guest's mode; set (through the kernel command line)
// only inside the VM.
const guestEnv = "CSI_COMPOSEFS_VM_GUEST"

// marker starts the console lines the guest writes for the host.
const marker = "@@VM "

type vmDeps struct {
	kernel, modules, busybox, qemu string
}

var (
	depsOnce sync.Once
	deps     vmDeps
	depsErr  error
	depsSkip string
)

// needVM returns the kernel, modules, busybox and QEMU, fetching them the
// first time; it skips the test only where they cannot be had here.
func needVM(t *testing.T) vmDeps {
	t.Helper()
	if os.Getenv(guestEnv) != "" {
		t.Skip("inside the VM")
	}
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skipf("the VM tests boot Debian's amd64 kernel; this is %s/%s", runtime.GOOS, runtime.GOARCH)
	}
	if testing.Short() {
		t.Skip("boots a VM (-short)")
	}
	depsOnce.Do(func() {
		cmd := exec.Command(filepath.Join(repoRoot(t), "hack", "vm-deps.sh"))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee) && ee.ExitCode() == 3:
			depsSkip = strings.TrimSpace(lastLines(stderr.String(), 3))
			return
		case err != nil:
			depsErr = fmt.Errorf("hack/vm-deps.sh: %v\n%s", err, lastLines(stderr.String(), 20))
			return
		}
		for _, line := range strings.Split(string(out), "\n") {
			k, v, _ := strings.Cut(line, "=")
			switch k {
			case "KERNEL":
				deps.kernel = v
			case "MODULES":
				deps.modules = v
			case "BUSYBOX":
				deps.busybox = v
			case "QEMU":
				deps.qemu = v
			}
		}
		if deps.kernel == "" || deps.modules == "" || deps.busybox == "" || deps.qemu == "" {
			depsErr = fmt.Errorf("hack/vm-deps.sh printed no complete set: %q", out)
		}
	})
	if depsSkip != "" {
		reftools.Unavailable(t, "QEMU or Debian's kernel cannot be had here: %s", depsSkip)
	}
	if depsErr != nil {
		t.Fatal(depsErr)
	}
	return deps
}

func repoRoot(t *testing.T) string {
	dir, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); err != nil {
		t.Fatalf("repository root not found from %s: %v", dir, err)
	}
	return dir
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// guestModules are what the tests need beyond the kernel's built-ins
// (fs-verity, virtio-pci, SHA-256 are built in); their dependencies are
// found in each module's .modinfo.
var guestModules = []string{"virtio_blk", "ext4", "erofs", "overlay"}

// softdepModules name the module providing a soft dependency (an alias:
// the package has no modules.alias before depmod runs).
var softdepModules = map[string]string{"crypto-crc32c": "crc32c_generic", "crc32c": "crc32c_generic"}

type kmod struct {
	name string
	data []byte // decompressed
}

// resolveModules returns the modules named and everything they depend on,
// dependencies first.
func resolveModules(dir string, names []string) ([]kmod, error) {
	files := make(map[string]string)
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, e os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if base, ok := strings.CutSuffix(e.Name(), ".ko.xz"); ok {
			files[strings.ReplaceAll(base, "-", "_")] = p
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var order []kmod
	state := make(map[string]int) // 1 visiting, 2 done
	var visit func(name string, optional bool) error
	visit = func(name string, optional bool) error {
		name = strings.ReplaceAll(name, "-", "_")
		switch state[name] {
		case 1:
			return fmt.Errorf("module dependency cycle at %s", name)
		case 2:
			return nil
		}
		path, ok := files[name]
		if !ok {
			if optional {
				return nil
			}
			return fmt.Errorf("module %s is not in %s", name, dir)
		}
		state[name] = 1
		data, err := exec.Command("xz", "-dc", path).Output()
		if err != nil {
			return fmt.Errorf("decompressing %s: %v", path, err)
		}
		info, err := modinfo(data)
		if err != nil {
			return fmt.Errorf("module %s: %v", name, err)
		}
		for _, sd := range strings.Fields(strings.TrimPrefix(info["softdep"], "pre:")) {
			if m, ok := softdepModules[sd]; ok {
				if err := visit(m, true); err != nil {
					return err
				}
			}
		}
		for _, dep := range strings.Split(info["depends"], ",") {
			if dep != "" {
				if err := visit(dep, false); err != nil {
					return err
				}
			}
		}
		state[name] = 2
		order = append(order, kmod{name: name, data: data})
		return nil
	}
	for _, n := range names {
		if err := visit(n, false); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// modinfo reads a module's .modinfo section (key=value strings).
func modinfo(ko []byte) (map[string]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, err
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	b, err := sec.Data()
	if err != nil {
		return nil, err
	}
	info := make(map[string]string)
	for _, kv := range bytes.Split(b, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			if info[k] != "" {
				v = info[k] + " " + v
			}
			info[k] = v
		}
	}
	return info, nil
}

// initScript is the guest's /init: mount the pseudo filesystems, load the
// modules, bring up loopback (the guest's only network), run the test
// binary, power off.
const initScript = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=384m tmp /tmp
while read m; do insmod /modules/$m.ko || echo "@@VM insmod $m failed"; done < /modules/order
ip link set lo up
echo "@@VM BOOTED"
LD_LIBRARY_PATH=/lib /guest.test -test.run '^TestGuest$' -test.v -test.timeout 20m
echo "@@VM EXIT $?"
sync
poweroff -f
`

var (
	initrdOnce sync.Once
	initrdPath string
	initrdErr  error
	initrdDir  string
)

// guestInitramfs builds (once per process) the initramfs: busybox, /init,
// the modules and this package's test binary (with the C library it links,
// if any). It is an uncompressed cpio: the emulated CPU would take seconds
// to gunzip it.
func guestInitramfs(t *testing.T, d vmDeps) string {
	t.Helper()
	initrdOnce.Do(func() {
		dir, err := os.MkdirTemp("", "csi-composefs-vm-")
		if err != nil {
			initrdErr = err
			return
		}
		initrdDir = dir
		initrdPath, initrdErr = buildInitramfs(repoRoot(t), dir, d)
	})
	if initrdErr != nil {
		t.Fatal(initrdErr)
	}
	return initrdPath
}

// TestMain removes the initramfs built for the process's tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if initrdDir != "" {
		os.RemoveAll(initrdDir)
	}
	os.Exit(code)
}

// pkgTests are package tests that need fs-verity under their temp
// directory: they skip on a host without it, and the verity guest runs
// them (with TMPDIR on its ext4 disk).
var pkgTests = []struct{ bin, pkg, run string }{
	{"cfs.test", "./pkg/cfs", "^TestKernelVerity$"},
	{"fetch.test", "./pkg/fetch", "^TestKernelVerity"},
}

func buildInitramfs(root, dir string, d vmDeps) (string, error) {
	bin := filepath.Join(dir, "guest.test")
	start := time.Now()
	// Built as the other tests build the plugin (cgo as configured, no
	// -trimpath), so that the packages compiled for them are reused; the
	// C library it links goes into the initramfs with it.
	build := exec.Command("go", "test", "-c", "-o", bin, "-ldflags=-s -w", ".")
	build.Env = append(os.Environ(), "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building the guest test binary: %v\n%s", err, out)
	}
	buildTime := time.Since(start)
	libs, err := sharedLibraries(bin)
	if err != nil {
		return "", err
	}
	pkgBins := make(map[string][]byte)
	for _, pt := range pkgTests {
		out := filepath.Join(dir, pt.bin)
		b := exec.Command("go", "test", "-c", "-o", out, "-ldflags=-s -w", pt.pkg)
		b.Dir = root
		b.Env = build.Env
		if o, err := b.CombinedOutput(); err != nil {
			return "", fmt.Errorf("building the tests of %s: %v\n%s", pt.pkg, err, o)
		}
		data, err := os.ReadFile(out)
		if err != nil {
			return "", err
		}
		pkgBins[pt.bin] = data
	}
	buildTime = time.Since(start)
	mods, err := resolveModules(d.modules, guestModules)
	if err != nil {
		return "", err
	}
	busybox, err := os.ReadFile(d.busybox)
	if err != nil {
		return "", err
	}
	guest, err := os.ReadFile(bin)
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "initramfs.cpio")
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	w := newCpio(f)
	for _, d := range []string{"bin", "dev", "proc", "sys", "tmp", "mnt", "modules", "lib", "lib64"} {
		w.dir(d)
	}
	for _, l := range libs {
		w.file(l.path, 0o755, l.data)
	}
	w.file("bin/busybox", 0o755, busybox)
	w.file("init", 0o755, []byte(initScript))
	w.file("guest.test", 0o755, guest)
	w.dir("pkgtests")
	for _, pt := range pkgTests {
		w.file("pkgtests/"+pt.bin, 0o755, pkgBins[pt.bin])
	}
	var order []string
	for _, m := range mods {
		w.file("modules/"+m.name+".ko", 0o644, m.data)
		order = append(order, m.name)
	}
	w.file("modules/order", 0o644, []byte(strings.Join(order, "\n")+"\n"))
	if err := w.close(); err != nil {
		return "", err
	}
	fmt.Fprintf(os.Stderr, "vm: guest test binary built in %s; modules %s\n", buildTime.Round(time.Millisecond), strings.Join(order, " "))
	return path, f.Close()
}

type sharedLib struct {
	path string // in the initramfs, without the leading slash
	data []byte
}

// libDirs are where the host's shared libraries are looked for.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"}

// sharedLibraries returns the dynamic loader and the shared libraries a
// binary needs (none for a static one): the loader at the path the binary
// names, the libraries under lib/ (LD_LIBRARY_PATH).
func sharedLibraries(bin string) ([]sharedLib, error) {
	var out []sharedLib
	seen := make(map[string]bool)
	var visit func(path string, isBin bool) error
	visit = func(path string, isBin bool) error {
		f, err := elf.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		if isBin {
			for _, p := range f.Progs {
				if p.Type != elf.PT_INTERP {
					continue
				}
				b, err := io.ReadAll(p.Open())
				if err != nil {
					return err
				}
				interp := strings.TrimRight(string(b), "\x00")
				data, err := os.ReadFile(interp)
				if err != nil {
					return fmt.Errorf("the loader of %s: %w", bin, err)
				}
				out = append(out, sharedLib{path: strings.TrimPrefix(interp, "/"), data: data})
			}
		}
		needed, err := f.ImportedLibraries()
		if err != nil {
			return err
		}
		for _, name := range needed {
			if seen[name] || strings.HasPrefix(name, "ld-linux") {
				continue
			}
			seen[name] = true
			found := ""
			for _, dir := range libDirs {
				if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
					found = filepath.Join(dir, name)
					break
				}
			}
			if found == "" {
				return fmt.Errorf("%s needs %s, found in none of %v", path, name, libDirs)
			}
			data, err := os.ReadFile(found)
			if err != nil {
				return err
			}
			out = append(out, sharedLib{path: "lib/" + name, data: data})
			if err := visit(found, false); err != nil {
				return err
			}
		}
		return nil
	}
	return out, visit(bin, true)
}

// cpioWriter writes a "newc" cpio archive, the initramfs format.
type cpioWriter struct {
	w   *bufio.Writer
	ino int
	err error
}

func newCpio(w io.Writer) *cpioWriter { return &cpioWriter{w: bufio.NewWriter(w)} }

func (c *cpioWriter) entry(name string, mode uint32, data []byte) {
	if c.err != nil {
		return
	}
	c.ino++
	nlink := 1
	if mode&0o170000 == 0o040000 {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	c.write([]byte(hdr + name + "\x00"))
	c.pad(len(hdr) + len(name) + 1)
	c.write(data)
	c.pad(len(data))
}

func (c *cpioWriter) write(b []byte) {
	if c.err == nil {
		_, c.err = c.w.Write(b)
	}
}

func (c *cpioWriter) pad(n int) {
	if r := n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) dir(name string)                         { c.entry(name, 0o040755, nil) }
func (c *cpioWriter) file(name string, perm uint32, b []byte) { c.entry(name, 0o100000|perm, b) }

func (c *cpioWriter) close() error {
	c.entry("TRAILER!!!", 0, nil)
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}

// newDisk makes an ext4 image with the verity feature, as a node's store
// filesystem would be made.
func newDisk(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-O", "verity", "-b", "4096",
		"-E", "lazy_itable_init=0,lazy_journal_init=0", path).CombinedOutput()
	if err != nil {
		t.Fatalf("mkfs.ext4 -O verity: %v\n%s", err, out)
	}
	return path
}

// vm is one QEMU run whose serial console the test reads line by line.
type vm struct {
	t     *testing.T
	cmd   *exec.Cmd
	stdin io.WriteCloser
	qmp   string
	start time.Time

	mu    sync.Mutex
	lines []string // console lines so far
	cond  chan struct{}
	done  chan struct{} // closed when QEMU exited
	err   error         // QEMU's exit status
}

// vmConfig is what a QEMU run gets besides the kernel and initramfs.
type vmConfig struct {
	drives []string          // QEMU -drive specs
	env    map[string]string // the guest's environment, on the kernel command line
	// qmp, when set, is a unix socket path for QEMU's machine protocol
	// (to save the VM's state: saveState).
	qmp string
	// incoming, when set, resumes a state saveState wrote instead of
	// booting (the drives must be the same).
	incoming string
}

// bootVM starts QEMU with the guest initramfs (or resumes a saved state).
// Software emulation only (-accel tcg): KVM is not needed.
func bootVM(t *testing.T, d vmDeps, initrd string, c vmConfig) *vm {
	t.Helper()
	keys := make([]string, 0, len(c.env))
	for k := range c.env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	cmdline := "console=ttyS0 quiet panic=-1 mitigations=off"
	for _, k := range keys {
		cmdline += " " + k + "=" + c.env[k]
	}
	args := []string{"-accel", "tcg,tb-size=256", "-cpu", "max", "-m", "768", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
		"-kernel", d.kernel, "-initrd", initrd, "-append", cmdline}
	for _, dr := range c.drives {
		args = append(args, "-drive", dr)
	}
	if c.qmp != "" {
		args = append(args, "-qmp", "unix:"+c.qmp+",server=on,wait=off")
	}
	if c.incoming != "" {
		args = append(args, "-incoming", "exec:cat "+c.incoming)
	}
	cmd := exec.Command(d.qemu, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	v := &vm{t: t, cmd: cmd, stdin: in, qmp: c.qmp, cond: make(chan struct{}), done: make(chan struct{}), start: time.Now()}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting QEMU: %v", err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := strings.TrimRight(sc.Text(), "\r")
			v.mu.Lock()
			v.lines = append(v.lines, line)
			close(v.cond)
			v.cond = make(chan struct{})
			v.mu.Unlock()
		}
		err := cmd.Wait()
		v.mu.Lock()
		v.err = err
		v.mu.Unlock()
		close(v.done)
	}()
	t.Cleanup(v.kill)
	return v
}

// bootAttempts bounds the boots bootGuest tries.
const bootAttempts = 3

// bootGuest boots the guest (bootVM) and waits until its /init says BOOTED
// (the kernel up, the modules loaded, before the test program starts). A
// kernel that panics before that is booted again, at most bootAttempts
// times in all: under software emulation on a loaded host, Debian's kernel
// has been seen (rarely) to panic in its first second, long before anything
// the tests exercise runs; every retry is logged. after, when set, runs
// after each failed boot (to collect what the run left, such as the disk's
// end of connection).
func bootGuest(t *testing.T, ctx context.Context, d vmDeps, initrd string, c vmConfig, after func()) *vm {
	t.Helper()
	for attempt := 1; ; attempt++ {
		v := bootVM(t, d, initrd, c)
		_, _, err := v.waitFor(ctx, 0, "BOOTED")
		if err == nil {
			return v
		}
		out := v.console()
		if !v.exited() || !strings.Contains(out, "Kernel panic") || attempt == bootAttempts {
			t.Fatalf("booting the guest (attempt %d): %v; console:\n%s", attempt, err, lastLines(out, 80))
		}
		i := strings.Index(out, "Kernel panic")
		t.Logf("boot %d: the guest kernel panicked before /init ran the tests (%q); booting again",
			attempt, strings.SplitN(out[i:], "\n", 2)[0])
		if after != nil {
			after()
		}
	}
}

// exited reports whether QEMU has exited.
func (v *vm) exited() bool {
	select {
	case <-v.done:
		return true
	default:
		return false
	}
}

// send types a line on the guest's console.
func (v *vm) send(line string) error {
	_, err := io.WriteString(v.stdin, line+"\n")
	return err
}

// saveState saves the running VM's state to path (a live migration to a
// file: the guest keeps running until it completes) and stops QEMU. A VM
// resumed from it (vmConfig.incoming) goes on from that moment, without
// booting: the guest must not have touched its disk yet.
func (v *vm) saveState(ctx context.Context, path string) error {
	c, err := dialQMP(ctx, v.qmp)
	if err != nil {
		return err
	}
	defer c.close()
	if _, err := c.call("migrate", map[string]any{"uri": "exec:cat > " + path}); err != nil {
		return err
	}
	for {
		r, err := c.call("query-migrate", nil)
		if err != nil {
			return err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(r, &st); err != nil {
			return err
		}
		switch st.Status {
		case "completed":
			_, _ = c.call("quit", nil)
			return v.wait(ctx)
		case "failed", "cancelled":
			return fmt.Errorf("saving the VM's state: migration %s: %s", st.Status, st.ErrorDesc)
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// qmpConn is a QEMU machine protocol connection (JSON, one message a line).
type qmpConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialQMP(ctx context.Context, path string) (*qmpConn, error) {
	var conn net.Conn
	var err error
	for {
		var d net.Dialer
		if conn, err = d.DialContext(ctx, "unix", path); err == nil {
			break
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return nil, fmt.Errorf("connecting to QEMU's QMP socket: %w", err)
		}
	}
	q := &qmpConn{c: conn, r: bufio.NewReader(conn)}
	if _, err := q.read(); err != nil { // the greeting
		conn.Close()
		return nil, err
	}
	if _, err := q.call("qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmpConn) close() { q.c.Close() }

func (q *qmpConn) read() (map[string]json.RawMessage, error) {
	line, err := q.r.ReadBytes('\n')
	if err != nil {
		return nil, fmt.Errorf("reading QMP: %w", err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(line, &m); err != nil {
		return nil, fmt.Errorf("QMP: %w: %q", err, line)
	}
	return m, nil
}

// call runs a command and returns its "return" value (events are skipped).
func (q *qmpConn) call(cmd string, args map[string]any) (json.RawMessage, error) {
	msg := map[string]any{"execute": cmd}
	if args != nil {
		msg["arguments"] = args
	}
	b, _ := json.Marshal(msg)
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		m, err := q.read()
		if err != nil {
			return nil, fmt.Errorf("QMP %s: %w", cmd, err)
		}
		if _, ok := m["event"]; ok {
			continue
		}
		if e, ok := m["error"]; ok {
			return nil, fmt.Errorf("QMP %s: %s", cmd, e)
		}
		return m["return"], nil
	}
}

// waitFor returns the first console line from index from on that starts
// with marker+prefix (without the marker), and the index after it.
func (v *vm) waitFor(ctx context.Context, from int, prefix string) (string, int, error) {
	for {
		line, next, ok := v.find(from, prefix)
		if ok {
			return line, next, nil
		}
		v.mu.Lock()
		cond := v.cond
		v.mu.Unlock()
		select {
		case <-cond:
		case <-v.done: // every line is in: one last look
			if line, next, ok := v.find(from, prefix); ok {
				return line, next, nil
			}
			return "", 0, fmt.Errorf("QEMU exited (%v) before %q", v.exitErr(), prefix)
		case <-ctx.Done():
			return "", 0, fmt.Errorf("no %q after %s: %w", prefix, time.Since(v.start).Round(time.Second), ctx.Err())
		}
	}
}

func (v *vm) find(from int, prefix string) (string, int, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for i := from; i < len(v.lines); i++ {
		if strings.HasPrefix(v.lines[i], marker+prefix) {
			return strings.TrimPrefix(v.lines[i], marker), i + 1, true
		}
	}
	return "", 0, false
}

func (v *vm) snapshot() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]string(nil), v.lines...)
}

func (v *vm) exitErr() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.err
}

// wait waits for QEMU to exit (the guest powers off).
func (v *vm) wait(ctx context.Context) error {
	select {
	case <-v.done:
		return v.exitErr()
	case <-ctx.Done():
		return fmt.Errorf("QEMU still running after %s: %w", time.Since(v.start).Round(time.Second), ctx.Err())
	}
}

// kill is the power cut: SIGKILL, so QEMU neither flushes nor closes
// anything cleanly.
func (v *vm) kill() {
	if v.cmd.Process != nil {
		_ = v.cmd.Process.Kill()
	}
	<-v.done
}

// console returns the console output, for a failure's report.
func (v *vm) console() string { return strings.Join(v.snapshot(), "\n") }

// guestLines returns the console lines that start with marker+prefix.
func (v *vm) guestLines(prefix string) []string {
	var out []string
	for _, l := range v.snapshot() {
		if strings.HasPrefix(l, marker+prefix) {
			out = append(out, strings.TrimPrefix(l, marker))
		}
	}
	return out
}

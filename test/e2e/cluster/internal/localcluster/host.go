package localcluster

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// kernelSysctls are the sysctls the kubelet (and a CNI gateway) may set;
// Up saves them before the kubelet starts, Down restores them.
var kernelSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward",
}

// hostRecord is what Up found on the host before changing it, kept in the
// work directory so that Down (also after a killed run) restores it.
type hostRecord struct {
	Sysctls map[string]string `json:"sysctls"`
	// Folders outside the work directory the kubelet or CNI create when
	// missing; Down removes the ones that were not there before.
	Absent []string `json:"absent"`
}

// hostDirs are created when missing by the kubelet (container log links,
// its device-plugin socket at a fixed path), the CNI plugins (result
// cache) and containerd's shims (their sockets).
var hostDirs = []string{"/var/log/containers", "/var/lib/cni", "/var/lib/kubelet", "/run/containerd"}

func (c *Cluster) recordPath() string { return c.path("host-record.json") }

// saveHost records the host's state unless a record exists (a record
// left by a killed run holds the values from before that run).
func (c *Cluster) saveHost() error {
	if _, err := os.Stat(c.recordPath()); err == nil {
		return nil
	}
	rec := hostRecord{Sysctls: map[string]string{}}
	for _, k := range kernelSysctls {
		v, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			continue
		}
		rec.Sysctls[k] = strings.TrimSpace(string(v))
	}
	for _, d := range hostDirs {
		if _, err := os.Lstat(d); errors.Is(err, fs.ErrNotExist) {
			rec.Absent = append(rec.Absent, d)
		}
	}
	raw, _ := json.MarshalIndent(rec, "", "  ")
	return os.WriteFile(c.recordPath(), raw, 0o644)
}

// restoreHost puts the recorded sysctls back and removes what the kubelet
// and CNI left outside the work directory.
func (c *Cluster) restoreHost() error {
	raw, err := os.ReadFile(c.recordPath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var rec hostRecord
	if err := json.Unmarshal(raw, &rec); err != nil {
		return fmt.Errorf("%s: %w", c.recordPath(), err)
	}
	var errs []error
	for k, v := range rec.Sysctls {
		cur, err := os.ReadFile("/proc/sys/" + k)
		if err == nil && strings.TrimSpace(string(cur)) == v {
			continue
		}
		if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restoring sysctl %s=%s: %w", k, v, err))
		} else {
			c.logf("restored sysctl %s=%s", strings.ReplaceAll(k, "/", "."), v)
		}
	}
	// The kubelet's links to container logs point into the work directory.
	if ents, err := os.ReadDir("/var/log/containers"); err == nil {
		for _, e := range ents {
			p := filepath.Join("/var/log/containers", e.Name())
			if t, err := os.Readlink(p); err == nil && strings.HasPrefix(t, c.Work+"/") {
				os.Remove(p)
			}
		}
	}
	// CNI's result cache of this cluster's network.
	if ents, err := os.ReadDir("/var/lib/cni/results"); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), CNINetwork+"-") {
				os.Remove(filepath.Join("/var/lib/cni/results", e.Name()))
			}
		}
	}
	for _, d := range rec.Absent {
		removeEmptyTree(d)
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	return os.Remove(c.recordPath())
}

// removeEmptyTree removes dir, the unix sockets in it and the folders
// below it left empty; it never removes any other file.
func removeEmptyTree(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		switch {
		case e.IsDir():
			removeEmptyTree(p)
		case e.Type()&fs.ModeSocket != 0:
			os.Remove(p)
		}
	}
	os.Remove(dir) // fails when not empty
}

// cgroupHierarchies lists the mounted cgroup hierarchies (v1 controllers,
// named ones, and the v2 unified one).
func cgroupHierarchies() ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && (fields[i+1] == "cgroup" || fields[i+1] == "cgroup2") {
				out = append(out, unescapeMount(fields[4]))
			}
		}
	}
	sort.Strings(out)
	return out, s.Err()
}

// makeCgroupRoot creates /<CgroupRoot> in every hierarchy (the kubelet
// requires its cgroup root to exist), with the cpuset of its parent.
func (c *Cluster) makeCgroupRoot() error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		d := filepath.Join(h, CgroupRoot)
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("cgroup %s: %w", d, err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if v, err := os.ReadFile(filepath.Join(h, f)); err == nil {
				if cur, err := os.ReadFile(filepath.Join(d, f)); err == nil && strings.TrimSpace(string(cur)) == "" {
					if err := os.WriteFile(filepath.Join(d, f), v, 0o644); err != nil {
						return fmt.Errorf("cgroup %s: %w", filepath.Join(d, f), err)
					}
				}
			}
		}
	}
	return nil
}

// cgroupTrees lists this cluster's cgroup folders, deepest first.
func cgroupTrees() []string {
	hs, _ := cgroupHierarchies()
	var dirs []string
	for _, h := range hs {
		root := filepath.Join(h, CgroupRoot)
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	sort.Slice(dirs, func(i, j int) bool { return strings.Count(dirs[i], "/") > strings.Count(dirs[j], "/") })
	return dirs
}

// killCgroupProcs SIGKILLs every process in the cluster's cgroups (pod
// containers and their sandboxes) until none is left.
func (c *Cluster) killCgroupProcs() {
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
		n := 0
		for _, d := range cgroupTrees() {
			raw, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
			if err != nil {
				continue
			}
			for _, l := range strings.Fields(string(raw)) {
				var pid int
				if _, err := fmt.Sscan(l, &pid); err == nil && pid > 1 && pid != os.Getpid() {
					_ = syscall.Kill(pid, syscall.SIGKILL)
					n++
				}
			}
		}
		if n == 0 {
			return
		}
		c.logf("killed %d pod processes", n)
		time.Sleep(300 * time.Millisecond)
	}
}

// removeCgroups removes the cluster's cgroup folders, deepest first.
func (c *Cluster) removeCgroups() error {
	var errs []error
	for _, d := range cgroupTrees() {
		var err error
		for i := 0; i < 50; i++ { // a cgroup whose last task just exited may be busy briefly
			if err = os.Remove(d); err == nil || errors.Is(err, fs.ErrNotExist) {
				err = nil
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// mountsUnder lists the mount points at or under dir, deepest (latest)
// first.
func mountsUnder(dirs ...string) ([]string, error) {
	raw, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range strings.Split(string(raw), "\n") {
		fields := strings.Fields(l)
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		for _, d := range dirs {
			if mp == d || strings.HasPrefix(mp, d+"/") {
				out = append(out, mp)
				break
			}
		}
	}
	// mountinfo lists parents before children; unmount in reverse order.
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space...).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountAll unmounts everything at or under the work directory, deepest
// first, detaching what stays busy.
func (c *Cluster) unmountAll() error {
	var errs []error
	for round := 0; round < 5; round++ {
		mps, err := mountsUnder(c.Work)
		if err != nil {
			return err
		}
		if len(mps) == 0 {
			return nil
		}
		errs = errs[:0]
		for _, mp := range mps {
			if err := unix.Unmount(mp, 0); err != nil && err != unix.EINVAL && err != unix.ENOENT {
				if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
					errs = append(errs, fmt.Errorf("unmounting %s: %w", mp, err))
				}
			}
		}
		if round == 0 {
			c.logf("unmounted %d mounts under %s", len(mps), c.Work)
		}
	}
	return errors.Join(errs...)
}

// ipCmd runs ip(8).
func ipCmd(args ...string) (string, error) {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// setupNetwork creates the CNI bridge with the kubernetes Service address
// on it (for the service proxy) and makes the rest of the service range
// unreachable, so nothing sent there leaves the host.
func (c *Cluster) setupNetwork() error {
	if _, err := ipCmd("link", "show", BridgeName); err != nil {
		if _, err := ipCmd("link", "add", BridgeName, "type", "bridge"); err != nil {
			return err
		}
	}
	if out, _ := ipCmd("-o", "addr", "show", "dev", BridgeName); !strings.Contains(out, " "+APIServiceIP+"/32") {
		if _, err := ipCmd("addr", "add", APIServiceIP+"/32", "dev", BridgeName); err != nil {
			return err
		}
	}
	if _, err := ipCmd("link", "set", BridgeName, "up"); err != nil {
		return err
	}
	if out, _ := ipCmd("route", "show", "type", "unreachable", ServiceCIDR); strings.TrimSpace(out) == "" {
		if _, err := ipCmd("route", "add", "unreachable", ServiceCIDR); err != nil {
			return err
		}
	}
	return nil
}

// teardownNetwork deletes the bridge (and veths still attached to it) and
// the route.
func (c *Cluster) teardownNetwork() error {
	var errs []error
	if out, err := ipCmd("-o", "link", "show", "master", BridgeName); err == nil {
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) >= 2 {
				name := strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0]
				if _, err := ipCmd("link", "del", name); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	if _, err := ipCmd("link", "show", BridgeName); err == nil {
		if _, err := ipCmd("link", "del", BridgeName); err != nil {
			errs = append(errs, err)
		} else {
			c.logf("deleted bridge %s", BridgeName)
		}
	}
	if out, _ := ipCmd("route", "show", "type", "unreachable", ServiceCIDR); strings.TrimSpace(out) != "" {
		if _, err := ipCmd("route", "del", "unreachable", ServiceCIDR); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

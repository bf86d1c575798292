package localcluster

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// pidRecord is what the work directory keeps about a started daemon: enough
// to tell it from another process that got its PID after it exited.
type pidRecord struct {
	PID       int      `json:"pid"`
	StartTime uint64   `json:"startTime"` // /proc/PID/stat field 22, clock ticks since boot
	Argv      []string `json:"argv"`
}

// startDaemon starts argv in a session of its own (it outlives this
// program), logging to log/<name>.log, and records its PID.
func (c *Cluster) startDaemon(name string, env []string, argv ...string) error {
	if err := os.MkdirAll(c.path("pid"), 0o755); err != nil {
		return err
	}
	if err := os.MkdirAll(c.LogDir(), 0o755); err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(c.LogDir(), name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = c.Work
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", name, err)
	}
	st, err := procStartTime(cmd.Process.Pid)
	if err != nil {
		return err
	}
	rec, _ := json.Marshal(pidRecord{PID: cmd.Process.Pid, StartTime: st, Argv: argv})
	if err := os.WriteFile(c.path("pid", name+".json"), rec, 0o644); err != nil {
		return err
	}
	// Reap it if it dies while this program still runs (its exit is seen
	// by the readiness checks); afterwards init does.
	go cmd.Wait() //nolint:errcheck
	c.logf("started %s (pid %d)", name, cmd.Process.Pid)
	return nil
}

// procStartTime reads field 22 of /proc/PID/stat.
func procStartTime(pid int) (uint64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(raw, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	fields := strings.Fields(string(raw[i+1:]))
	if len(fields) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: too short", pid)
	}
	if fields[0] == "Z" || fields[0] == "X" {
		return 0, fmt.Errorf("process %d: %w", pid, os.ErrProcessDone)
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

func procCmdline(pid int) ([]string, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil, err
	}
	raw = bytes.TrimSuffix(raw, []byte{0})
	if len(raw) == 0 {
		return nil, nil
	}
	return strings.Split(string(raw), "\x00"), nil
}

// daemonAlive reports whether the recorded daemon still runs: same PID,
// same start time, same command line.
func (c *Cluster) daemonAlive(name string) (int, bool) {
	raw, err := os.ReadFile(c.path("pid", name+".json"))
	if err != nil {
		return 0, false
	}
	var rec pidRecord
	if json.Unmarshal(raw, &rec) != nil || rec.PID <= 1 {
		return 0, false
	}
	return rec.PID, rec.matches()
}

func (r pidRecord) matches() bool {
	st, err := procStartTime(r.PID)
	if err != nil || st != r.StartTime {
		return false
	}
	argv, err := procCmdline(r.PID)
	if err != nil || len(argv) != len(r.Argv) {
		return false
	}
	for i := range argv {
		if argv[i] != r.Argv[i] {
			return false
		}
	}
	return true
}

// stopDaemon stops the recorded daemon (SIGTERM, SIGKILL after grace) if
// the recorded PID is still that daemon, and forgets it.
func (c *Cluster) stopDaemon(name string, grace time.Duration) {
	if pid, ok := c.daemonAlive(name); ok {
		c.logf("stopping %s (pid %d)", name, pid)
		c.killPID(pid, grace)
	}
	os.Remove(c.path("pid", name+".json"))
}

// killPID sends SIGTERM, waits up to grace for the process to go, then
// SIGKILLs it.
func (c *Cluster) killPID(pid int, grace time.Duration) {
	st, err := procStartTime(pid)
	if err != nil {
		return
	}
	gone := func() bool {
		s, err := procStartTime(pid)
		return err != nil || s != st
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	for deadline := time.Now().Add(grace); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if gone() {
			return
		}
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if gone() {
			return
		}
	}
	c.logf("warning: process %d did not exit after SIGKILL", pid)
}

// daemonNames are the programs the cluster starts (argv[0]'s base name).
var daemonNames = map[string]bool{
	"etcd": true, "containerd": true, "containerd-shim-runc-v2": true, "kube-apiserver": true,
	"kube-controller-manager": true, "kubelet": true, "e2e-cluster": true,
}

// strayProcesses lists processes this cluster started whose records are
// lost (a run killed between start and record): the cluster's programs
// whose command line names the work directory. Pod containers are found
// through their cgroups instead.
func (c *Cluster) strayProcesses() []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || pid <= 1 {
			continue
		}
		argv, err := procCmdline(pid)
		if err != nil || len(argv) == 0 {
			continue
		}
		if daemonNames[filepath.Base(argv[0])] && argvNames(argv, c.Work) {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids
}

// argvNames reports whether an argument is dir or a path under it (also
// as the value of a --flag=value).
func argvNames(argv []string, dir string) bool {
	for _, a := range argv {
		if i := strings.IndexByte(a, '='); i >= 0 && strings.HasPrefix(a, "-") {
			a = a[i+1:]
		}
		if a == dir || strings.HasPrefix(a, dir+"/") {
			return true
		}
	}
	return false
}

var errNotReady = errors.New("not ready")

// waitFor polls ready every interval until it returns nil, the timeout
// passes, or the named daemon died.
func (c *Cluster) waitFor(what, daemon string, timeout time.Duration, ready func() error) error {
	start := time.Now()
	var last error
	for time.Since(start) < timeout {
		if last = ready(); last == nil {
			c.logf("%s ready after %s", what, time.Since(start).Round(10*time.Millisecond))
			return nil
		}
		if daemon != "" {
			if _, ok := c.daemonAlive(daemon); !ok {
				// Look again before giving up: a loaded host can make one
				// read of /proc fail.
				time.Sleep(time.Second)
				if pid, ok := c.daemonAlive(daemon); !ok {
					return fmt.Errorf("%s (pid %d) exited; see %s", daemon, pid, filepath.Join(c.LogDir(), daemon+".log"))
				}
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %s: %v", what, timeout, last)
}

package main

import (
	"os/exec"
	"strings"
	"testing"
)

// Every process of the one binary (the node plugin, each pull) maps the
// pages its package initialisers touch. client-go's clientset, scheme and
// event recorder made every one of them start at 35 MiB resident instead of
// 22 (bench/README.md, "Start-up memory"): pod events have their own small
// client (pkg/driver/events_kube.go), and client-go must not come back
// through another import.
func TestBinaryLinksNoClientGo(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command to list the binary's packages")
	}
	out, err := exec.Command(gobin, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, p := range strings.Fields(string(out)) {
		if p == "k8s.io/client-go" || strings.HasPrefix(p, "k8s.io/client-go/") {
			t.Errorf("the binary links %s", p)
		}
	}
}

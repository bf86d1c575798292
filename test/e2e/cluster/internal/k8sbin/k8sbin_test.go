package k8sbin

import (
	"strings"
	"testing"

	"golang.org/x/mod/modfile"
)

const k8sGoMod = `module k8s.io/kubernetes

go 1.26.0

require (
	github.com/spf13/cobra v1.10.0
	k8s.io/api v0.0.0
	k8s.io/client-go v0.0.0
)

replace (
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/client-go => ./staging/src/k8s.io/client-go
	github.com/example/forked => github.com/example/fork v1.2.3
)
`

func TestWrapperGoMod(t *testing.T) {
	out, err := WrapperGoMod([]byte(k8sGoMod), "v1.37.2")
	if err != nil {
		t.Fatal(err)
	}
	f, err := modfile.Parse("go.mod", out, nil)
	if err != nil {
		t.Fatalf("wrapper go.mod does not parse: %v\n%s", err, out)
	}
	if f.Go == nil || f.Go.Version != "1.26.0" {
		t.Errorf("go directive %v, want k8s's 1.26.0", f.Go)
	}
	if len(f.Require) != 1 || f.Require[0].Mod.Path != "k8s.io/kubernetes" || f.Require[0].Mod.Version != "v1.37.2" {
		t.Errorf("require = %v, want only k8s.io/kubernetes v1.37.2", f.Require)
	}
	got := map[string]string{}
	for _, r := range f.Replace {
		if r.Old.Path != r.New.Path {
			t.Errorf("replace %s => %s: want the module itself", r.Old.Path, r.New.Path)
		}
		got[r.Old.Path] = r.New.Version
	}
	want := map[string]string{"k8s.io/api": "v0.37.2", "k8s.io/client-go": "v0.37.2"}
	if len(got) != len(want) {
		t.Errorf("replaces %v, want %v (only the ./staging/ ones)", got, want)
	}
	for m, v := range want {
		if got[m] != v {
			t.Errorf("replace %s => %q, want %q", m, got[m], v)
		}
	}
}

func TestWrapperGoModErrors(t *testing.T) {
	for _, tc := range []struct{ name, gomod, want string }{
		{"other module", "module example.com/x\n\ngo 1.26\n", "not k8s.io/kubernetes"},
		{"no go directive", "module k8s.io/kubernetes\n\nreplace k8s.io/api => ./staging/src/k8s.io/api\n", "no go directive"},
		{"no staging replaces", "module k8s.io/kubernetes\n\ngo 1.26\n", "no module with a ./staging/ path"},
		{"garbage", "module (\n", "parsing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := WrapperGoMod([]byte(tc.gomod), "v1.37.2")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestNewRefusesNonReleases(t *testing.T) {
	for _, v := range []string{"1.37.2", "v1.38.0-beta.0", "v2.0.0", "latest"} {
		if _, err := New(t.TempDir(), v); err == nil {
			t.Errorf("New(%q) accepted", v)
		}
	}
	if _, err := New(t.TempDir(), "v1.37.2"); err != nil {
		t.Errorf("New(v1.37.2): %v", err)
	}
}

func TestLdflagsStampVersion(t *testing.T) {
	b, _ := New(t.TempDir(), "v1.37.2")
	fl := b.ldflags(testTime)
	for _, want := range []string{"k8s.io/component-base/version.gitVersion=v1.37.2", "k8s.io/client-go/pkg/version.gitMinor=37",
		"k8s.io/component-base/version.gitMajor=1", "-s", "-w"} {
		if !strings.Contains(fl, want) {
			t.Errorf("ldflags %q lack %q", fl, want)
		}
	}
}

func TestCachedNeedsEveryBinaryAndTheSameRecipe(t *testing.T) {
	b, _ := New(t.TempDir(), "v1.37.2")
	want := stamp{Version: "v1.37.2", Go: "go1.26.8", Commands: Commands, Recipe: recipeVersion}
	if b.cached(want) {
		t.Fatal("empty folder counted as cached")
	}
	writeFakeBin(t, b, want)
	if !b.cached(want) {
		t.Fatal("complete folder not counted as cached")
	}
	other := want
	other.Go = "go1.27.0"
	if b.cached(other) {
		t.Error("binaries of another Go counted as cached")
	}
	removeOne(t, b)
	if b.cached(want) {
		t.Error("folder missing a binary counted as cached")
	}
}

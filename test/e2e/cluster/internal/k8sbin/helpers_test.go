package k8sbin

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"
)

var testTime = time.Date(2026, 11, 28, 0, 0, 0, 0, time.UTC)

func writeFakeBin(t *testing.T, b *Builder, s stamp) {
	t.Helper()
	if err := os.MkdirAll(b.BinDir(), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range Commands {
		if err := os.WriteFile(b.Path(c), []byte("#!/bin/true\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	raw, _ := json.Marshal(s)
	if err := os.WriteFile(filepath.Join(b.BinDir(), ".stamp.json"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
}

func removeOne(t *testing.T, b *Builder) {
	t.Helper()
	if err := os.Remove(b.Path(Commands[len(Commands)-1])); err != nil {
		t.Fatal(err)
	}
}

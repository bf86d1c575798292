package fetch

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestKeptSignatures: kept signatures survive reopening the store, are not
// kept twice, stay within their bounds (oldest dropped), ignore a file
// that is not one the store wrote, and go with their image in GC.
func TestKeptSignatures(t *testing.T) {
	repo := t.TempDir()
	d := writeRepoImage(t, repo, "a.cfs", makeFiles("f", 61, 2, 1000))
	ts := newTestServer(t, repo)
	root := t.TempDir()
	opts := testOptions()
	opts.GCGrace = time.Nanosecond
	opts.MaxSize = 1
	s := openStore(t, root, opts)
	ctx := context.Background()

	if err := s.KeepSignature(ctx, d, KeptSignature{Blob: []byte("sig")}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("keeping a signature of an image not stored: %v, want ErrNotFound", err)
	}
	mustPull(t, s, newSource(t, ts.URL, HTTPOptions{}), "a.cfs")
	sig := func(i int) KeptSignature { return KeptSignature{Blob: []byte{'s', byte('0' + i)}} }
	for _, k := range []KeptSignature{sig(1), sig(1), {Manifest: "sha256:" + strings.Repeat("a", 64), Payload: []byte("p"), Signature: "c2ln"}} {
		if err := s.KeepSignature(ctx, d, k); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	s = openStore(t, root, opts)
	got, err := s.KeptSignatures(ctx, d)
	if err != nil || len(got) != 2 || !got[0].equal(sig(1)) || got[1].Manifest == "" {
		t.Fatalf("after reopening: %+v %v, want the blob signature once, then the manifest's", got, err)
	}
	checkInvariant(t, root)

	// Bounds: at most maxKeptSignatures, the newest kept.
	for i := 2; i < 2+maxKeptSignatures; i++ {
		if err := s.KeepSignature(ctx, d, sig(i)); err != nil {
			t.Fatal(err)
		}
	}
	got, _ = s.KeptSignatures(ctx, d)
	if len(got) != maxKeptSignatures || !got[len(got)-1].equal(sig(1+maxKeptSignatures)) || !got[0].equal(sig(2)) {
		t.Fatalf("after %d more: %d kept (%q … %q), want the newest %d", maxKeptSignatures, len(got), got[0].Blob, got[len(got)-1].Blob, maxKeptSignatures)
	}
	// Bounds: bytes. A large one pushes out older ones; too large is refused.
	big := KeptSignature{Blob: bytes.Repeat([]byte{'b'}, maxKeptBytes-1)}
	if err := s.KeepSignature(ctx, d, big); err != nil {
		t.Fatal(err)
	}
	if got, _ = s.KeptSignatures(ctx, d); len(got) != 1 || !got[0].equal(big) {
		t.Fatalf("after a signature of %d bytes: %d kept, want only it", big.size(), len(got))
	}
	if err := s.KeepSignature(ctx, d, KeptSignature{Blob: make([]byte, maxKeptBytes+1)}); err == nil {
		t.Fatal("a signature over the bound was kept")
	}

	// A file the store did not write counts as none.
	path := s.keptPath(d)
	for name, data := range map[string]string{
		"not JSON":        "sig",
		"unknown field":   `{"version":1,"signatures":[],"verdict":"ok"}`,
		"other version":   `{"version":2,"signatures":[{"blob":"c2ln"}]}`,
		"trailing data":   `{"version":1,"signatures":[]} {}`,
		"too many":        `{"version":1,"signatures":[` + strings.Repeat(`{"blob":"c2ln"},`, maxKeptSignatures) + `{"blob":"c2ln"}]}`,
		"too large":       `{"version":1,"signatures":[{"blob":"` + strings.Repeat("A", 2*maxKeptBytes) + `"}]}`,
		"blob not base64": `{"version":1,"signatures":[{"blob":"!"}]}`,
	} {
		if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
		if got, err := s.KeptSignatures(ctx, d); err != nil || len(got) != 0 {
			t.Errorf("%s: %d kept, %v; want none, no error", name, len(got), err)
		}
	}
	// A symbolic link (to a file that would parse) counts as none.
	good := filepath.Join(t.TempDir(), "kept.json")
	if err := os.WriteFile(good, []byte(`{"version":1,"signatures":[{"blob":"c2ln"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Remove(path)
	if err := os.Symlink(good, path); err != nil {
		t.Fatal(err)
	}
	if got, err := s.KeptSignatures(ctx, d); err != nil || len(got) != 0 {
		t.Errorf("a symbolic link: %d kept, %v; want none, no error", len(got), err)
	}
	// Keeping one again replaces the damaged file.
	if err := s.KeepSignature(ctx, d, sig(1)); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	var kf keptFile
	if err := json.Unmarshal(b, &kf); err != nil || len(kf.Signatures) != 1 {
		t.Fatalf("after keeping over a damaged file: %s %v", b, err)
	}

	// GC: the signatures go with their image; strays are swept.
	stray := filepath.Join(root, signaturesDir, "stray")
	if err := os.WriteFile(stray, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	orphan := s.keptPath(writeRepoImage(t, repo, "b.cfs", makeFiles("g", 62, 1, 100)))
	if err := os.WriteFile(orphan, b, 0o644); err != nil {
		t.Fatal(err)
	}
	total := func() int64 {
		u, err := DiskUsage(ctx, root)
		if err != nil {
			t.Fatal(err)
		}
		return u.Objects.Bytes + u.Images.Bytes + u.Signatures.Bytes
	}
	before := total()
	st, err := s.GC(ctx)
	if err != nil || st.ImagesRemoved != 1 {
		t.Fatalf("GC: %+v %v, want the image removed", st, err)
	}
	// What GC freed counts the image's signatures and the swept orphan.
	if freed := before - total(); st.BytesFreed != freed {
		t.Errorf("GC says it freed %d bytes, the store shrank by %d", st.BytesFreed, freed)
	}
	ents, _ := os.ReadDir(filepath.Join(root, signaturesDir))
	if len(ents) != 0 {
		t.Fatalf("after GC, signatures/ holds %d files, want none", len(ents))
	}
	checkInvariant(t, root)
}

// FuzzParseKept: a kept-signatures file is store content (a tampered store
// is in the threat model): parsing never panics and stays within bounds.
func FuzzParseKept(f *testing.F) {
	f.Add([]byte(`{"version":1,"signatures":[{"blob":"c2ln"},{"manifest":"sha256:00","payload":"cA==","signature":"c2ln"}]}`))
	f.Add([]byte(`{"version":1,"signatures":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		sigs, err := parseKept(b)
		if err != nil {
			return
		}
		total := 0
		for _, k := range sigs {
			total += k.size()
		}
		if len(sigs) > maxKeptSignatures || total > maxKeptBytes {
			t.Fatalf("accepted %d signatures of %d bytes", len(sigs), total)
		}
	})
}

// TestKeptSignaturesAccounted: kept signatures count in the store's size:
// DiskUsage reports them, GC's BytesInUse includes them, and MaxSize
// budgets them with their image (a small image with large signatures is
// removed when the two together exceed it), freeing them with it.
func TestKeptSignaturesAccounted(t *testing.T) {
	repo := t.TempDir()
	da := writeRepoImage(t, repo, "a.cfs", makeFiles("f", 71, 1, 100))
	db := writeRepoImage(t, repo, "b.cfs", makeFiles("g", 72, 1, 100))
	ts := newTestServer(t, repo)
	root := t.TempDir()
	opts := testOptions()
	opts.GCGrace = time.Nanosecond
	s := openStore(t, root, opts)
	ctx := context.Background()
	src := newSource(t, ts.URL, HTTPOptions{})
	mustPull(t, s, src, "a.cfs")
	mustPull(t, s, src, "b.cfs")
	before, err := DiskUsage(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	if before.Signatures.Files != 0 {
		t.Fatalf("signatures before any was kept: %+v", before.Signatures)
	}
	// Large signatures of a (older: used first), none of b.
	for i := range maxKeptSignatures {
		if err := s.KeepSignature(ctx, da, KeptSignature{Blob: bytes.Repeat([]byte{byte('a' + i)}, maxKeptBytes/maxKeptSignatures-1)}); err != nil {
			t.Fatal(err)
		}
	}
	u, err := DiskUsage(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	kept := s.keptAllocated(da)
	if u.Signatures.Files != 1 || u.Signatures.Bytes != kept || kept < maxKeptBytes {
		t.Fatalf("DiskUsage of the kept signatures: %+v, want 1 file of %d bytes (at least %d)", u.Signatures, kept, maxKeptBytes)
	}
	st, err := s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := u.Objects.Bytes + u.Images.Bytes + u.Signatures.Bytes; st.BytesInUse != want {
		t.Errorf("GC's BytesInUse %d, want %d (objects, images and signatures)", st.BytesInUse, want)
	}

	// A budget that holds both images and their objects, but not a's
	// signatures as well: a (the least recently used) goes, with them.
	s.Close()
	opts.MaxSize = u.Objects.Bytes + u.Images.Bytes + u.Signatures.Bytes/2
	s = openStore(t, root, opts)
	st, err = s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.ImagesRemoved != 1 || s.HasImage(da) || !s.HasImage(db) {
		t.Fatalf("GC within %d bytes: %+v, a stored %v, b stored %v; want a removed with its signatures", opts.MaxSize, st, s.HasImage(da), s.HasImage(db))
	}
	if st.BytesFreed < kept {
		t.Errorf("GC freed %d bytes, less than a's signatures alone (%d)", st.BytesFreed, kept)
	}
	if u, _ := DiskUsage(ctx, root); u.Signatures.Files != 0 {
		t.Errorf("signatures left after their image went: %+v", u.Signatures)
	}
	checkInvariant(t, root)
}

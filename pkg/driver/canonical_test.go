package driver

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// TestPublishNonCanonicalImage: a volume whose image is not canonical (a
// valid image with bytes after its end, which the reader accepts) gets a
// final error naming the reason and nothing is mounted; a node started
// with AllowNonCanonicalImages (--allow-noncanonical-images) publishes it.
func TestPublishNonCanonicalImage(t *testing.T) {
	needRoot(t)
	repo := newTestRepo(t)
	repo.publish(t, "app", sampleFiles(3))
	b, err := os.ReadFile(filepath.Join(repo.dir, "images", "app"))
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, make([]byte, 4096)...)
	if err := os.WriteFile(filepath.Join(repo.dir, "images", "crafted"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	dg := cfs.VerityDigestOf(b)
	vc := map[string]string{"repository": repo.srv.URL, "image": "crafted", "digest": dg.String()}

	e := newTestEnv(t, Config{})
	target := filepath.Join(t.TempDir(), "vol")
	cleanupMounts(t, target)
	_, err = e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc))
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "canonical") {
		t.Fatalf("publish of a non-canonical image: %v, want FailedPrecondition naming the reason", err)
	}
	assertClean(t, e, target)
	e.close()

	e.storeOpts.AllowNonCanonicalImages = true
	e.open(Config{})
	if _, err := e.d.NodePublishVolume(context.Background(), publishReq("v", target, vc)); err != nil {
		t.Fatalf("with AllowNonCanonicalImages: %v", err)
	}
	if _, err := e.d.NodeUnpublishVolume(context.Background(), unpublishReq("v", target)); err != nil {
		t.Fatal(err)
	}
}

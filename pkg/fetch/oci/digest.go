package oci

import (
	"context"
	"fmt"
	"io"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// ConvertedDigest converts the container image s names without storing
// anything (file contents are hashed as they stream by) and returns the
// composefs digest a node's conversion gives: the value to pin in a
// volume's digest attribute.
func ConvertedDigest(ctx context.Context, s *ImageSource) (cfs.Digest, error) {
	p, err := s.resolve(ctx)
	if err != nil {
		return cfs.Digest{}, err
	}
	root, _, err := p.Build(ctx, hashSink{ctx})
	if err != nil {
		return cfs.Digest{}, err
	}
	d, err := cfs.WriteImage(io.Discard, root, cfs.WriteOptions{MinVersion: 1, MaxVersion: 1})
	if err != nil {
		return cfs.Digest{}, err
	}
	if !p.expect.IsZero() && d != p.expect {
		return d, fmt.Errorf("%s converts to %s, but its annotation says %s", s, d, p.expect)
	}
	return d, nil
}

// hashSink only hashes objects.
type hashSink struct{ ctx context.Context }

func (h hashSink) Object(_ context.Context, r io.Reader, size int64) (cfs.Digest, error) {
	v := cfs.NewVerityHash()
	n, err := io.Copy(v, io.LimitReader(r, size))
	if err == nil && n != size {
		err = fmt.Errorf("file content: %d bytes, the entry says %d", n, size)
	}
	return v.Digest(), err
}

func (hashSink) Challenge(string, int64) int64 { return 0 }

func (h hashSink) Logger() klog.Logger { return klog.FromContext(h.ctx) }

func (hashSink) WillFetch(int64) {}
func (hashSink) Received(int64)  {}

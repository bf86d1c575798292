package trust

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/sigstore/sigstore-go/pkg/root"
	"github.com/sigstore/sigstore-go/pkg/verify"
	"github.com/sigstore/sigstore/pkg/signature"
)

// bundleArtifact is what a sigstore bundle is checked against: the
// content itself when open is set (needed for ed25519, which signs the
// message whole), else its SHA-256.
type bundleArtifact struct {
	open   func() (io.ReadCloser, error)
	sha256 []byte
}

// verifyBundle checks a sigstore bundle (a message signature over a file,
// or a DSSE envelope whose in-toto statement names the artifact's digest)
// with sigstore-go, key-based and offline: no transparency-log entry nor
// timestamp is needed (one in the bundle is not checked: that needs the
// log's keys, which is online trust this node does not have).
func verifyBundle(keys []*Key, sig *BlobSignature, art bundleArtifact) (*Key, error) {
	if sig.digest != nil && !bytes.Equal(sig.digest, art.sha256) {
		return nil, fmt.Errorf("%w: the bundle signs content with sha256:%s, not this content (sha256:%s)",
			ErrBadSignature, hex.EncodeToString(sig.digest), hex.EncodeToString(art.sha256))
	}
	// The hint is the signer's say-so: it picks the key to try first,
	// and names the reason when nothing verifies.
	ordered := make([]*Key, 0, len(keys))
	hinted := false
	for _, k := range keys {
		if sig.hint != "" && k.Hint == sig.hint {
			ordered = append([]*Key{k}, ordered...)
			hinted = true
		} else {
			ordered = append(ordered, k)
		}
	}
	var last error
	for _, k := range ordered {
		for _, v := range k.verifiers {
			err := verifyBundleWith(v, sig, art)
			if err == nil {
				return k, nil
			}
			var rerr *readError
			if errors.As(err, &rerr) {
				return nil, err
			}
			last = err
		}
	}
	if sig.hint != "" && !hinted {
		return nil, fmt.Errorf("%w: the bundle's key hint %s matches none of %s", ErrUnknownKey, truncate(sig.hint), keyList(keys))
	}
	return nil, fmt.Errorf("%w with any accepted key (%s): %v", ErrBadSignature, keyList(keys), last)
}

func verifyBundleWith(v signature.Verifier, sig *BlobSignature, art bundleArtifact) error {
	tm := root.NewTrustedPublicKeyMaterial(func(string) (root.TimeConstrainedVerifier, error) {
		return root.NewExpiringKey(v, time.Time{}, time.Time{}), nil
	})
	sv, err := verify.NewVerifier(tm, verify.WithNoObserverTimestamps())
	if err != nil {
		return fmt.Errorf("setting up the verifier: %w", err)
	}
	var ap verify.ArtifactPolicyOption
	if art.open != nil {
		r, err := art.open()
		if err != nil {
			return &readError{err}
		}
		defer r.Close()
		ap = verify.WithArtifact(r)
	} else {
		ap = verify.WithArtifactDigest("sha256", art.sha256)
	}
	_, err = sv.Verify(sig.bundle, verify.NewPolicy(ap, verify.WithKey()))
	return err
}

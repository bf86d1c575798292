package driver

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
	"github.com/csi-composefs/csi-composefs/pkg/trust"
	"github.com/opencontainers/go-digest"
)

// TrustPolicy gives the trust policy in force (a *trust.Watcher, which
// reloads its file).
type TrustPolicy interface {
	Policy() *trust.Policy
}

// WithTrustPolicy makes the driver check image signatures as the policy p
// gives says, per source prefix.
func WithTrustPolicy(p TrustPolicy) Option { return func(d *Driver) { d.trust = p } }

// errSignatureNotVerified: pullPolicy Never, a signature is required, and
// this node keeps no signature of the image.
var errSignatureNotVerified = errors.New("this node keeps no signature of it (it was never verified here), and pullPolicy Never forbids fetching one; publish it once with IfNotPresent")

// isVerdict reports whether err is a signature verdict (PermissionDenied).
func isVerdict(err error) bool {
	return errors.Is(err, trust.ErrUnsigned) || errors.Is(err, trust.ErrUnknownKey) || errors.Is(err, trust.ErrBadSignature)
}

// trustRule returns the policy's rule for the source, or nil.
func (d *Driver) trustRule(src SourceSpec) *trust.Rule {
	if d.trust == nil {
		return nil
	}
	return d.trust.Policy().Rule(src.URL)
}

// verdictKey is one verified signature: image (or manifest) content by an
// accepted key. A signature does not expire, so the verdict holds while
// the key stays in the policy (a rule without it does not consult it).
type verdictKey struct {
	content string // "image <digest>" or "manifest sha256:…"
	keyID   string
}

// maxVerdicts bounds the verdicts kept; they are cheap to earn again.
const maxVerdicts = 100000

// verifiedBy returns the rule's key that verified content before, or nil.
func (d *Driver) verifiedBy(content string, rule *trust.Rule) *trust.Key {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, k := range rule.Keys {
		if d.verdicts[verdictKey{content, k.ID}] {
			return k
		}
	}
	return nil
}

func (d *Driver) recordVerdict(content string, k *trust.Key) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.verdicts) >= maxVerdicts {
		clear(d.verdicts)
	}
	d.verdicts[verdictKey{content, k.ID}] = true
}

// manifestVerdict is a verified signature of the registry manifest an
// image is fetched by: the key, and the material to keep.
type manifestVerdict struct {
	key  *trust.Key
	kept fetch.KeptSignature
}

// keep keeps the signature that verified the stored image dg, so that the
// verdict survives a restart (it is verified again there, offline, against
// the policy then in force). Failing to keep it costs a verification from
// the source later.
func (d *Driver) keep(ctx context.Context, dg cfs.Digest, sig fetch.KeptSignature) {
	if err := d.store.KeepSignature(ctx, dg, sig); err != nil {
		klog.FromContext(ctx).Error(err, "Keeping the verified signature failed; after a restart the image is verified from its source again", "image", dg.String())
	}
}

// verifiedOnNode returns the rule's key that verified the stored image dg
// before: in this process, or by a signature kept in the store and
// verified again now, offline, with the rule's keys (a key removed from the
// policy does not count). refused lists the kept signatures the rule does
// not accept now (verdicts); err is a failure to read them.
//
// A kept signature over the image file (an HTTP repository's) proves
// itself: it is checked over the stored bytes. A kept signature of a
// registry manifest covers the manifest only, and counts only when
// manifests is set (pullPolicy Never, which could not ask the registry;
// otherwise the registry is asked again). For a composefs artifact (kind
// oci) the kept copy of the manifest must also be the one signed and name
// this image; for a container image (docker) that this image is what the
// node made of the manifest is the store's word.
func (d *Driver) verifiedOnNode(ctx context.Context, dg cfs.Digest, rule *trust.Rule, manifests bool, kind SourceKind) (_ *trust.Key, refused verdictErrors, _ error) {
	content := "image " + dg.String()
	if k := d.verifiedBy(content, rule); k != nil {
		return k, nil, nil
	}
	kept, err := d.store.KeptSignatures(ctx, dg)
	if err != nil || len(kept) == 0 {
		return nil, nil, err
	}
	var blob *trust.Blob
	for i := len(kept) - 1; i >= 0; i-- { // newest first
		ks := kept[i]
		var k *trust.Key
		var err error
		what := fmt.Sprintf("kept signature %d", i)
		switch {
		case len(ks.Blob) > 0:
			if blob == nil {
				b, err := d.imageBlob(dg)
				if err != nil {
					return nil, nil, err
				}
				blob = &b
			}
			var sig *trust.BlobSignature
			if sig, err = trust.ParseBlobSignature(ks.Blob); err == nil {
				k, err = rule.VerifyBlob(sig, *blob)
			}
		case ks.Manifest != "" && !manifests:
			continue
		case ks.Manifest != "":
			what += " (of manifest " + ks.Manifest + ")"
			if kind == SourceOCIArtifact {
				err = keptManifestNames(ks, dg)
			}
			switch {
			case err != nil:
			case len(ks.Bundle) > 0:
				k, err = rule.VerifyManifestBundle(ks.Bundle, ks.Manifest)
			default:
				k, err = rule.VerifySimpleSigning(ks.Payload, ks.Signature, ks.Manifest)
			}
		default:
			continue
		}
		if err == nil {
			if ks.Manifest == "" {
				// Only a signature over the image itself becomes this
				// process's verdict; a manifest's is checked again at
				// each use (it is cheap: no image read).
				d.recordVerdict(content, k)
			}
			klog.FromContext(ctx).V(2).Info("Image signature kept on the node verified", "image", dg.String(), "key", k.String(), "policyPrefix", rule.Prefix)
			return k, nil, nil
		}
		if !isVerdict(err) {
			return nil, nil, fmt.Errorf("checking the %s of image %s: %w", what, dg, err)
		}
		refused = append(refused, fmt.Errorf("%s: %w", what, err))
	}
	return nil, refused, nil
}

// checkImageSignature applies the trust policy to the image dg of an HTTP
// repository, as stored: the signatures published beside the image's
// name (cosign sign-blob over the image file) must verify over the
// stored bytes, which are the bytes named by dg, so the digest verified
// is the digest pinned and mounted. It returns nil when the policy has no
// rule for the source, or when the rule does not require a signature and
// none is published. signer is the verified signature of the manifest dg
// was read from (a registry source, checkManifestSignature), if one did.
// A signature verified before (kept in the store) is verified again
// offline first; with pullPolicy Never that is the only way.
func (d *Driver) checkImageSignature(ctx context.Context, spec VolumeSpec, src fetch.Source, name string, dg cfs.Digest, signer *manifestVerdict) error {
	rule := d.trustRule(spec.Source)
	if rule == nil {
		return nil
	}
	content := "image " + dg.String()
	log := klog.FromContext(ctx)
	if signer != nil {
		d.recordVerdict(content, signer.key)
		d.keep(ctx, dg, signer.kept)
		return nil
	}
	k, refused, err := d.verifiedOnNode(ctx, dg, rule, spec.PullPolicy == PullNever, spec.Source.Kind)
	if err != nil {
		return err
	}
	if k != nil {
		log.V(4).Info("Image signature verified before", "image", dg.String(), "key", k.String())
		return nil
	}
	if spec.PullPolicy == PullNever {
		switch {
		case !rule.Require:
			return nil
		case len(refused) > 0:
			d.metrics.signatureCheck("rejected")
			return fmt.Errorf("image %s (trust policy prefix %s), signatures kept on this node (pullPolicy Never fetches no other): %w", dg, rule.Prefix, refused)
		default:
			return fmt.Errorf("image %s: %w", dg, errSignatureNotVerified)
		}
	}
	if _, ok := src.(fetch.SignatureSource); !ok {
		if rule.Require {
			return fmt.Errorf("image %s: %w: %s publishes no signatures this node can check", dg, trust.ErrUnsigned, src)
		}
		return nil
	}
	ref := fetch.ImageRef{Name: name, Digest: dg}
	files, err := d.store.Signatures(ctx, src, ref)
	if err != nil {
		return err
	}
	if len(files) == 0 {
		if rule.Require {
			d.metrics.signatureCheck("unsigned")
			return fmt.Errorf("image %s: %w (trust policy prefix %s): no %s.sig nor %s.bundle is published", ref, trust.ErrUnsigned, rule.Prefix, ref.String(), ref.String())
		}
		return nil
	}
	blob, err := d.imageBlob(dg)
	if err != nil {
		return err
	}
	refused = nil
	for _, f := range files {
		sig, err := trust.ParseBlobSignature(f.Data)
		var k *trust.Key
		if err == nil {
			k, err = rule.VerifyBlob(sig, blob)
		}
		if err == nil {
			d.recordVerdict(content, k)
			d.keep(ctx, dg, fetch.KeptSignature{Blob: f.Data})
			d.metrics.signatureCheck("verified")
			log.V(2).Info("Image signature verified", "image", dg.String(), "signature", f.Location, "key", k.String(), "policyPrefix", rule.Prefix)
			return nil
		}
		if !isVerdict(err) {
			return fmt.Errorf("checking the signature %s: %w", f.Location, err)
		}
		refused = append(refused, fmt.Errorf("%s: %w", f.Location, err))
	}
	d.metrics.signatureCheck("rejected")
	return fmt.Errorf("image %s (trust policy prefix %s): %w", ref, rule.Prefix, refused)
}

// imageBlob is the stored image dg as signed content.
func (d *Driver) imageBlob(dg cfs.Digest) (trust.Blob, error) {
	path := d.store.ImagePath(dg)
	open := func() (io.ReadCloser, error) { return os.Open(path) }
	f, err := open()
	if err != nil {
		return trust.Blob{}, fmt.Errorf("reading image %s: %w", dg, err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return trust.Blob{}, fmt.Errorf("reading image %s: %w", dg, err)
	}
	b := trust.Blob{Open: open}
	h.Sum(b.SHA256[:0])
	return b, nil
}

// keptManifestNames checks the kept copy of a composefs artifact's
// manifest: it is the manifest the signature covers (by digest) and its
// annotation names the image dg. A mismatch is a verdict (ErrBadSignature):
// the signature is genuine but not of this image.
func keptManifestNames(ks fetch.KeptSignature, dg cfs.Digest) error {
	if len(ks.ManifestBytes) == 0 {
		return fmt.Errorf("%w: no copy of the manifest is kept with it, so that the manifest names this image cannot be checked", trust.ErrBadSignature)
	}
	if got := digest.FromBytes(ks.ManifestBytes); got.String() != ks.Manifest {
		return fmt.Errorf("%w: the manifest kept with it has digest %s, not the signed %s", trust.ErrBadSignature, got, ks.Manifest)
	}
	named, err := oci.ArtifactImage(ks.ManifestBytes)
	if err != nil {
		return fmt.Errorf("%w: the signed manifest: %w", trust.ErrBadSignature, err)
	}
	if named != dg {
		return fmt.Errorf("%w: the signed manifest names image %s, not this one", trust.ErrBadSignature, named)
	}
	return nil
}

// verdictErrors are the refusals of each signature file; errors.Is sees
// each of them.
type verdictErrors []error

func (e verdictErrors) Error() string {
	s := make([]string, len(e))
	for i, err := range e {
		s[i] = err.Error()
	}
	return strings.Join(s, "; ")
}

func (e verdictErrors) Unwrap() []error { return e }

// checkManifestSignature applies the trust policy to what the volume's
// reference names in a registry now: it resolves the name to a manifest
// digest and checks the signatures cosign stores for that digest (the
// sha256-<hex>.sig tag, sigstore bundle referrers). It returns the
// manifest digest and the verified signature; none (and no error) when
// the rule does not require a signature and none is stored.
func (d *Driver) checkManifestSignature(ctx context.Context, spec VolumeSpec, src fetch.ManifestSigner, rule *trust.Rule) (string, *manifestVerdict, error) {
	log := klog.FromContext(ctx)
	m, err := d.store.ManifestSignatures(ctx, src, spec.Ref.Name)
	if err != nil {
		return "", nil, err
	}
	manifest, sigs := m.Digest, m.Signatures
	var manifestBytes []byte // kept for an artifact: it names the image
	if spec.Source.Kind == SourceOCIArtifact {
		manifestBytes = m.Bytes
	}
	where := fmt.Sprintf("%s@%s (trust policy prefix %s)", spec.Source.URL, manifest, rule.Prefix)
	if len(sigs) == 0 {
		if rule.Require {
			d.metrics.signatureCheck("unsigned")
			return "", nil, fmt.Errorf("image %s, manifest %s: %w: the registry holds no %s tag nor sigstore bundle referrer for it",
				spec.Ref, where, trust.ErrUnsigned, trust.SignatureTag(manifest))
		}
		return manifest, nil, nil
	}
	var refused verdictErrors
	for _, s := range sigs {
		var k *trust.Key
		switch {
		case s.Keyless:
			err = fmt.Errorf("%w: a keyless signature (a certificate); this node verifies key-based signatures (cosign sign --key)", trust.ErrBadSignature)
		case s.Bundle != nil:
			k, err = rule.VerifyManifestBundle(s.Bundle, manifest)
		default:
			k, err = rule.VerifySimpleSigning(s.Payload, s.Signature, manifest)
		}
		if err == nil {
			d.metrics.signatureCheck("verified")
			log.V(2).Info("Manifest signature verified", "manifest", manifest, "signature", s.Location, "key", k.String(), "policyPrefix", rule.Prefix)
			return manifest, &manifestVerdict{key: k, kept: fetch.KeptSignature{
				Manifest: manifest, ManifestBytes: manifestBytes, Payload: s.Payload, Signature: s.Signature, Bundle: s.Bundle}}, nil
		}
		if !isVerdict(err) {
			return "", nil, fmt.Errorf("checking the signature %s: %w", s.Location, err)
		}
		refused = append(refused, fmt.Errorf("%s: %w", s.Location, err))
	}
	d.metrics.signatureCheck("rejected")
	return "", nil, fmt.Errorf("image %s, manifest %s: %w", spec.Ref, where, refused)
}

package main

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
	"github.com/csi-composefs/csi-composefs/pkg/trust"
)

func newImageVerifyCmd() *cobra.Command {
	var (
		keys       []string
		signatures []string
		sf         sourceFlags
		rf         registryFlags
	)
	cmd := &cobra.Command{
		Use:   "verify --key KEY (IMAGE | oci://REGISTRY/REPO:TAG | docker://… | URL)",
		Short: "Check an image's cosign signature the way the node does",
		Long: `Check a cosign signature with public keys (PEM, as cosign.pub), offline and
key-based, as the node's trust policy does:

  IMAGE     a composefs image file, signed with cosign sign-blob --key; the
            signature is IMAGE.sig or IMAGE.bundle, or --signature FILE
  URL       an image of an HTTP repository, https://REPO/images/NAME: its
            NAME.sig and NAME.bundle are fetched beside it
  oci://…   a registry reference signed with cosign sign --key: the
  docker:// sha256-<hex>.sig signature tag and sigstore bundle referrers of
            the manifest the reference names

It prints what was verified (the image's fs-verity digest, or the manifest
digest) and the key; it exits 1 when no signature verifies.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(keys) == 0 {
				return usageErrorf("--key is required")
			}
			rule := &trust.Rule{Require: true}
			for _, p := range keys {
				b, err := os.ReadFile(p)
				if err != nil {
					return usageErrorf("--key: %v", err)
				}
				k, err := trust.ParsePublicKey(p, b)
				if err != nil {
					return usageErrorf("--key %s: %v", p, err)
				}
				rule.Keys = append(rule.Keys, k)
			}
			arg := args[0]
			out := cmd.OutOrStdout()
			switch {
			case isRegistryRef(arg):
				if len(signatures) > 0 {
					return usageErrorf("--signature is for image files: a registry holds its signatures")
				}
				return verifyRegistry(cmd.Context(), out, rule, arg, &sf, &rf)
			case strings.HasPrefix(arg, "http://") || strings.HasPrefix(arg, "https://"):
				if len(signatures) > 0 {
					return usageErrorf("--signature is for image files: NAME.sig and NAME.bundle are fetched beside the image")
				}
				return verifyURL(cmd.Context(), out, rule, arg, &sf)
			default:
				return verifyFile(out, rule, arg, signatures)
			}
		},
	}
	cmd.Flags().StringArrayVar(&keys, "key", nil, "public key file (PEM) that may have signed it (repeatable)")
	cmd.Flags().StringArrayVar(&signatures, "signature", nil, "signature or bundle file of an IMAGE file (repeatable; default IMAGE.sig and IMAGE.bundle)")
	sf.addRegistryCredentials(cmd)
	rf.add(cmd, false)
	return cmd
}

// verifyFile checks a local image file's sign-blob signatures.
func verifyFile(out io.Writer, rule *trust.Rule, path string, sigPaths []string) error {
	var files []fetch.SignatureFile
	if len(sigPaths) == 0 {
		for _, suffix := range []string{".sig", ".bundle"} {
			b, err := os.ReadFile(path + suffix)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				return err
			}
			files = append(files, fetch.SignatureFile{Location: path + suffix, Data: b})
		}
		if len(files) == 0 {
			return fmt.Errorf("%s: %w: neither %s.sig nor %s.bundle exists (or give --signature)", path, trust.ErrUnsigned, path, path)
		}
	}
	for _, p := range sigPaths {
		b, err := os.ReadFile(p)
		if err != nil {
			return usageErrorf("--signature: %v", err)
		}
		files = append(files, fetch.SignatureFile{Location: p, Data: b})
	}
	return verifyBlob(out, rule, path, path, files)
}

// verifyURL fetches an HTTP repository's image and its signatures.
func verifyURL(ctx context.Context, out io.Writer, rule *trust.Rule, u string, sf *sourceFlags) error {
	base, name, ok := strings.Cut(u, "/images/")
	if !ok || name == "" || strings.Contains(name, "/") {
		return usageErrorf("%s: want an image URL of an HTTP repository, REPO/images/NAME", fetch.RedactURL(u))
	}
	sf.repository = base
	src, err := sf.source()
	if err != nil {
		return err
	}
	ref := fetch.ImageRef{Name: name}
	files, err := src.ImageSignatures(ctx, ref)
	if err != nil {
		return err
	}
	if len(files) == 0 {
		return fmt.Errorf("%s: %w: no %s.sig nor %s.bundle is published", fetch.RedactURL(u), trust.ErrUnsigned, name, name)
	}
	body, _, err := src.OpenImage(ctx, ref)
	if err != nil {
		return err
	}
	defer body.Close()
	tmp, err := os.CreateTemp("", "csi-composefs-verify-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if _, err := io.Copy(tmp, body); err != nil {
		return fmt.Errorf("downloading %s: %w", fetch.RedactURL(u), err)
	}
	return verifyBlob(out, rule, fetch.RedactURL(u), tmp.Name(), files)
}

// verifyBlob checks the signature files over the image at path.
func verifyBlob(out io.Writer, rule *trust.Rule, what, path string, files []fetch.SignatureFile) error {
	open := func() (io.ReadCloser, error) { return os.Open(path) }
	f, err := open()
	if err != nil {
		return err
	}
	h := sha256.New()
	dg, _, err := cfs.VerityDigestReader(io.TeeReader(f, h))
	f.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	blob := trust.Blob{Open: open}
	h.Sum(blob.SHA256[:0])
	var refused []string
	for _, sf := range files {
		sig, err := trust.ParseBlobSignature(sf.Data)
		var k *trust.Key
		if err == nil {
			k, err = rule.VerifyBlob(sig, blob)
		}
		if err == nil {
			fmt.Fprintf(out, "Verified: %s (fs-verity digest sha256:%s), %s %s by key %s\n", what, dg, sig.Kind(), sf.Location, k)
			return nil
		}
		refused = append(refused, fmt.Sprintf("%s: %v", sf.Location, err))
	}
	return fmt.Errorf("%s: no signature verifies: %s", what, strings.Join(refused, "; "))
}

// verifyRegistry checks what a registry holds for the reference's manifest.
func verifyRegistry(ctx context.Context, out io.Writer, rule *trust.Rule, arg string, sf *sourceFlags, rf *registryFlags) error {
	ref, err := oci.ParseReference(arg)
	if err != nil {
		return usageError{err}
	}
	o, err := rf.options(sf)
	if err != nil {
		return err
	}
	src, err := oci.NewRepoSource(ref, o)
	if err != nil {
		return usageError{err}
	}
	name := ref.Name()
	manifest, _, err := src.ResolveManifest(ctx, name)
	if err != nil {
		return err
	}
	sigs, err := src.ManifestSignatures(ctx, manifest)
	if err != nil {
		return err
	}
	what := ref.Repo() + "@" + manifest
	if len(sigs) == 0 {
		return fmt.Errorf("%s: %w: the registry holds no %s tag nor sigstore bundle referrer for it", what, trust.ErrUnsigned, trust.SignatureTag(manifest))
	}
	var refused []string
	for _, s := range sigs {
		var k *trust.Key
		switch {
		case s.Keyless:
			err = errors.New("a keyless signature (a certificate): verify it with cosign; the node checks key-based signatures only")
		case s.Bundle != nil:
			k, err = rule.VerifyManifestBundle(s.Bundle, manifest)
		default:
			k, err = rule.VerifySimpleSigning(s.Payload, s.Signature, manifest)
		}
		if err == nil {
			fmt.Fprintf(out, "Verified: %s (%s), %s by key %s\n", what, arg, s.Location, k)
			return nil
		}
		refused = append(refused, fmt.Sprintf("%s: %v", s.Location, err))
	}
	return fmt.Errorf("%s: no signature verifies: %s", what, strings.Join(refused, "; "))
}

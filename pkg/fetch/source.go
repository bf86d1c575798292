// Package fetch fetches composefs images and their backing objects from a
// source (an HTTP repository here; an OCI registry later) into one
// node-wide, content-addressed store, fetching only the objects the node
// does not have yet and verifying every byte against its fs-verity digest.
package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// ImageRef names an image in a source.
type ImageRef struct {
	// Name is the image's name in the source: a human name ("app-1.2.cfs")
	// or, for an HTTP repository, the image digest in hex. It may be empty
	// when Digest is set; the digest's hex is then used as the name.
	Name string
	// Digest, when not zero, is the image's expected fs-verity digest: an
	// image with another digest is refused and nothing is kept, and an image
	// already in the store is used without contacting the source.
	Digest cfs.Digest
}

// String names the reference for errors and logs.
func (r ImageRef) String() string {
	switch {
	case r.Name == "":
		return r.Digest.String()
	case r.Digest.IsZero():
		return r.Name
	}
	return r.Name + "@" + r.Digest.String()
}

// name returns the name to ask the source for.
func (r ImageRef) name() string {
	if r.Name == "" && !r.Digest.IsZero() {
		return r.Digest.String()
	}
	return r.Name
}

// Source is where images and objects come from. Implementations must be
// safe for concurrent use. The store verifies everything a source returns
// (size and fs-verity digest), so a source need not be trusted.
//
// The interface is kept open for an OCI registry source: OpenImage resolves
// a reference (a tag or a digest) to the composefs image, and OpenObject
// fetches one backing file by its fs-verity digest, knowing the size the
// image records (a registry source maps the digest to a blob or a range of
// one, which it learns when it resolves the image).
type Source interface {
	// String describes the source for logs and errors, without credentials.
	String() string
	// OpenImage opens the image named by ref. size is the length announced
	// by the source, or -1 when unknown.
	OpenImage(ctx context.Context, ref ImageRef) (body io.ReadCloser, size int64, err error)
	// OpenObject opens the object whose fs-verity digest is d; size is the
	// file size the image records for it.
	OpenObject(ctx context.Context, d cfs.Digest, size uint64) (io.ReadCloser, error)
}

// ObjectLocator is implemented by sources that can name where an object is
// fetched from (a URL), for error messages.
type ObjectLocator interface {
	ObjectLocation(d cfs.Digest) string
}

// objectLocation names where src fetches d from.
func objectLocation(src Source, d cfs.Digest) string {
	if l, ok := src.(ObjectLocator); ok {
		return l.ObjectLocation(d)
	}
	return src.String()
}

// Errors a Source wraps (in a *SourceError) so that the store knows whether
// to retry. The store also wraps ErrDigestMismatch and ErrSizeMismatch.
var (
	// ErrNotFound: the source has no such image or object. Permanent.
	ErrNotFound = errors.New("not found")
	// ErrUnauthorized: the source refused the credentials (or their
	// absence). Permanent.
	ErrUnauthorized = errors.New("unauthorized")
	// ErrTransient marks a failure worth retrying: 5xx, 429, connection
	// reset, timeout, short read.
	ErrTransient = errors.New("transient failure")
	// ErrDigestMismatch: the bytes do not have the digest they must have.
	// Permanent.
	ErrDigestMismatch = errors.New("digest mismatch")
	// ErrSizeMismatch: the bytes are longer than the size the image records,
	// or an image is larger than allowed. Permanent.
	ErrSizeMismatch = errors.New("size mismatch")
	// ErrInvalidImage: the image is not a valid composefs image. Permanent.
	ErrInvalidImage = errors.New("invalid composefs image")
	// ErrRedirectRefused: the source redirected outside the allowed
	// sources, or from https to http. Permanent.
	ErrRedirectRefused = errors.New("redirect refused")
	// ErrRedirectLoop: the source redirected in a loop or too many times.
	// Permanent.
	ErrRedirectLoop = errors.New("too many redirects")
	// ErrInvalidCredentials: credentials that cannot be sent (a control
	// character in a token). Permanent.
	ErrInvalidCredentials = errors.New("invalid credentials")
)

// SourceError is a failed request to a source.
type SourceError struct {
	Op     string // "fetching image", "fetching object"
	URL    string // what was requested; Error redacts it (RedactURL)
	Status int    // HTTP status, 0 when none
	Err    error  // wraps one of the errors above when it is classified
}

func (e *SourceError) Error() string {
	var b strings.Builder
	b.WriteString(e.Op)
	b.WriteString(" ")
	b.WriteString(RedactURL(e.URL))
	if e.Status != 0 {
		fmt.Fprintf(&b, ": HTTP %d", e.Status)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

func (e *SourceError) Unwrap() error { return e.Err }

// transientError marks err as worth retrying while keeping it unwrappable.
type transientError struct{ err error }

func (e transientError) Error() string { return e.err.Error() }
func (e transientError) Unwrap() []error {
	return []error{e.err, ErrTransient}
}

// Transient wraps err so that errors.Is(err, ErrTransient) holds.
func Transient(err error) error {
	if err == nil || errors.Is(err, ErrTransient) {
		return err
	}
	return transientError{err}
}

// IsTransient reports whether err is worth retrying. Cancellation and
// deadlines are never transient: the caller gave up.
func IsTransient(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	return errors.Is(err, ErrTransient)
}

// RefBinder is implemented by sources that serve one image reference at a
// time (an OCI repository: objects are found through the artifact a tag
// names). BindRef returns the source for ref; callers use it for the
// image and its objects alike.
type RefBinder interface {
	BindRef(ref ImageRef) (Source, error)
}

// BindRef returns src bound to ref when src is a RefBinder, src otherwise.
func BindRef(src Source, ref ImageRef) (Source, error) {
	if b, ok := src.(RefBinder); ok {
		return b.BindRef(ref)
	}
	return src, nil
}

package driver

import (
	"context"
	"errors"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// errNotOnNode: pullPolicy Never and the node lacks the image or an object.
var errNotOnNode = errors.New("not on this node and pullPolicy is Never")

// errNotAuthorized: pullPolicy Never and the volume's source has not yet
// shown this node that it holds the content (with these credentials).
var errNotAuthorized = errors.New("the volume's source has not yet shown this node that it holds this content for these credentials, and pullPolicy Never forbids asking; publish it once with IfNotPresent")

// errorCode maps an error of a publish step to the gRPC code kubelet acts
// on. Final codes (InvalidArgument, NotFound, PermissionDenied,
// FailedPrecondition, Internal) make kubelet show the error on the pod and
// give up on this attempt; non-final codes (Aborted, Unavailable,
// ResourceExhausted, DeadlineExceeded) mean "still in progress, retry".
func errorCode(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return codes.Aborted
	case isVerdict(err):
		return codes.PermissionDenied
	case errors.Is(err, errNotAuthorized), errors.Is(err, errNotOnNode), errors.Is(err, errSignatureNotVerified):
		return codes.FailedPrecondition
	case errors.Is(err, fetch.ErrRedirectRefused):
		return codes.PermissionDenied
	case errors.Is(err, fetch.ErrRedirectLoop):
		return codes.FailedPrecondition
	case errors.Is(err, fetch.ErrInvalidCredentials):
		return codes.InvalidArgument
	case errors.Is(err, fetch.ErrNotProven):
		return codes.PermissionDenied
	case errors.Is(err, fetch.ErrNotFound):
		return codes.NotFound
	case errors.Is(err, fetch.ErrUnauthorized):
		return codes.PermissionDenied
	case errors.Is(err, fetch.ErrDigestMismatch), errors.Is(err, fetch.ErrSizeMismatch),
		errors.Is(err, fetch.ErrInvalidImage), errors.Is(err, cfs.ErrImageDigestMismatch),
		errors.Is(err, cfs.ErrNotComposefsImage), errors.Is(err, cfs.ErrVerityUnsupported),
		errors.Is(err, cfs.ErrVerityNotEnabled):
		return codes.FailedPrecondition
	case errors.Is(err, fetch.ErrResourceLimit), errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return codes.ResourceExhausted
	case fetch.IsTransient(err):
		return codes.Unavailable
	}
	return codes.Internal
}

// toStatus turns err into a status with the code errorCode picks and a
// message saying what was being done. A status passes through unchanged.
func toStatus(what string, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Errorf(errorCode(err), "%s: %v", what, err)
}

// isFinal reports whether kubelet treats the code as final (the volume is
// not in progress any more).
func isFinal(c codes.Code) bool {
	switch c {
	case codes.OK, codes.Canceled, codes.DeadlineExceeded, codes.Unavailable,
		codes.ResourceExhausted, codes.Aborted:
		return false
	}
	return true
}

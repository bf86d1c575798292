package fetch

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// or ctx ends, sleeping with exponential backoff and full jitter.
func (s *Store) retry(ctx context.Context, what string, fn func(context.Context) error) error {
	return s.retryWith(ctx, what, nil, fn)
}

// retryWith is retry that also tells backOff about each failure it
// retries, with how long the source asked to wait (Retry-After, 0 when it
// did not say). A source's Retry-After is honoured, up to maxRetryAfter,
// when longer than the backoff.
func (s *Store) retryWith(ctx context.Context, what string, backOff func(retryAfter time.Duration), fn func(context.Context) error) error {
	log := klog.FromContext(ctx)
	delay := s.opts.RetryBaseDelay
	for attempt := 0; ; attempt++ {
		err := fn(ctx)
		if err == nil {
			return nil
		}
		if isNoSpace(err) || !IsTransient(err) {
			return err
		}
		if attempt >= s.opts.Retries {
			return fmt.Errorf("%w (gave up after %d attempts)", err, attempt+1)
		}
		s.c.retries.Add(1)
		sleep := time.Duration(rand.Int64N(int64(delay))) + delay/2
		after := retryAfterOf(err)
		sleep = max(sleep, after)
		if backOff != nil {
			backOff(after)
		}
		log.V(1).Info("retrying", "what", what, "attempt", attempt+1, "in", sleep, "err", err)
		t := time.NewTimer(sleep)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (while retrying after: %w)", context.Cause(ctx), err)
		}
		delay = min(2*delay, s.opts.RetryMaxDelay)
	}
}

func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// maxRetryAfter bounds how long a source's Retry-After makes a retry wait.
const maxRetryAfter = time.Minute

// retryAfterOf is the wait a source asked for with the failure err, at
// most maxRetryAfter (0 when it asked for none).
func retryAfterOf(err error) time.Duration {
	var se *SourceError
	if errors.As(err, &se) {
		return min(se.RetryAfter, maxRetryAfter)
	}
	return 0
}

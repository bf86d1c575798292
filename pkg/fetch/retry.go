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

// Package tick runs periodic work for xlbd's loops.
package tick

import (
	"context"
	"time"
)

// Every calls fn every interval, and at once whenever wake (which may be
// nil) receives, until ctx ends; it then returns nil. fn runs on the
// caller's goroutine, never twice at the same time.
func Every(ctx context.Context, interval time.Duration, wake <-chan struct{}, fn func()) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-wake:
		}
		fn()
	}
}

package tick

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

func TestEvery(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	wake := make(chan struct{})
	var n atomic.Int32
	done := make(chan error)
	go func() { done <- Every(ctx, time.Hour, wake, func() { n.Add(1) }) }()
	wake <- struct{}{}
	wake <- struct{}{} // taken only once the first call returned
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := n.Load(); got < 1 || got > 2 {
		t.Errorf("fn ran %d times for 2 wakes and no tick", got)
	}
	n.Store(0)
	ctx, cancel = context.WithTimeout(context.Background(), 55*time.Millisecond)
	defer cancel()
	if err := Every(ctx, 10*time.Millisecond, nil, func() { n.Add(1) }); err != nil {
		t.Fatal(err)
	}
	if got := n.Load(); got < 3 || got > 6 {
		t.Errorf("fn ran %d times in 55ms every 10ms", got)
	}
}

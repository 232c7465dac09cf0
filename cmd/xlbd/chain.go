package main

import (
	"context"
	"fmt"

	"github.com/xlb-project/xlb/internal/control"
)

// ChainList implements control.Handler.
func (d *daemon) ChainList(context.Context) ([]control.ChainMember, error) {
	return nil, fmt.Errorf("chain: %w", control.ErrNotSupported)
}

// ChainAdd implements control.Handler.
func (d *daemon) ChainAdd(context.Context, control.ChainMember) error {
	return fmt.Errorf("chain: %w", control.ErrNotSupported)
}

// ChainRemove implements control.Handler.
func (d *daemon) ChainRemove(context.Context, string) error {
	return fmt.Errorf("chain: %w", control.ErrNotSupported)
}

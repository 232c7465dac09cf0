package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/xlb-project/xlb/internal/control"

	"github.com/xlb-project/xlb/internal/balancer"
	"github.com/xlb-project/xlb/internal/config"
)

// selector gives each service the selection of its policy.
type selector struct {
	log *slog.Logger
}

func newSelector(_ *config.Config, log *slog.Logger) *selector {
	return &selector{log: log}
}

// check refuses services whose policy cannot be served.
func (s *selector) check(svcs []config.Service) error {
	for i, svc := range svcs {
		if svc.Policy != "random" {
			return fmt.Errorf("services[%d]: policy %q: %w (built in: random)", i, svc.Policy, errUnknownPolicy)
		}
	}
	return nil
}

func (s *selector) Select(ctx context.Context, svc balancer.ServiceState) (balancer.Selection, error) {
	return balancer.Uniform{}.Select(ctx, svc)
}

func (s *selector) Close() {}

// SetPolicy implements control.Handler.
func (d *daemon) SetPolicy(ctx context.Context, req control.PolicyRequest) (control.PolicyResult, error) {
	return control.PolicyResult{}, fmt.Errorf("policy swap: %w", control.ErrNotSupported)
}

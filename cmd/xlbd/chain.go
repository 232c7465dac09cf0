package main

import (
	"context"
	"fmt"

	"github.com/xlb-project/xlb/internal/chain"
	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/control"
)

// chainOptions are the chain's options from the configuration.
func chainOptions(cfg *config.Config, d *daemon) chain.Options {
	return chain.Options{
		Pipeline:    d.bal.Pipeline(),
		PinRoot:     d.state.ChainPath(),
		XLBPriority: cfg.XLBPriority,
		Logger:      d.log,
		Adopt:       d.bal.Adopted() != nil,
	}
}

// chainSpecs are the configured chain members.
func chainSpecs(cfg *config.Config) []chain.Spec {
	out := make([]chain.Spec, 0, len(cfg.Chain))
	for _, m := range cfg.Chain {
		prio := -1
		if m.Priority != nil {
			prio = *m.Priority
		}
		out = append(out, chain.Spec{Name: m.Name, Object: m.Object, Program: m.Program, Priority: prio, ContinueOn: m.ContinueOn})
	}
	return out
}

// checkChain refuses chain members whose object is not an ELF file or
// could be written by a user other than root, and
// a pin path that is not on a bpffs when members need pins, before
// anything is touched.
func checkChain(cfg *config.Config) error {
	for i, m := range cfg.Chain {
		if _, err := chain.CheckObject(m.Object); err != nil {
			return fmt.Errorf("chain[%d].object: %w", i, err)
		}
	}
	if len(cfg.Chain) > 0 {
		if err := chain.CheckPinPath(cfg.PinPath); err != nil {
			return fmt.Errorf("pin-path: %w", err)
		}
	}
	return nil
}

// ChainList implements control.Handler.
func (d *daemon) ChainList(context.Context) ([]control.ChainMember, error) {
	var out []control.ChainMember
	for _, m := range d.chain.List() {
		out = append(out, control.ChainMember{
			Name: m.Name, Object: m.Object, Program: m.Program, SHA256: m.SHA256, Priority: m.Priority,
			ContinueOn: m.ContinueOn, Builtin: m.Builtin, PinPath: m.PinDir, Maps: m.Maps,
		})
	}
	return out, nil
}

// ChainAdd implements control.Handler.
func (d *daemon) ChainAdd(_ context.Context, m control.ChainMember) error {
	return d.chain.Add(chain.Spec{Name: m.Name, Object: m.Object, Program: m.Program, Priority: m.Priority, ContinueOn: m.ContinueOn})
}

// ChainRemove implements control.Handler.
func (d *daemon) ChainRemove(_ context.Context, name string) error {
	return d.chain.Remove(name)
}

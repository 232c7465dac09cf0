package main

import (
	"fmt"

	"github.com/xlb-project/xlb/internal/chain"
	"github.com/xlb-project/xlb/internal/config"
)

// chainOptions are the chain's options from the configuration.
func chainOptions(cfg *config.Config, d *daemon) chain.Options {
	return chain.Options{
		Pipeline:    d.bal.Pipeline(),
		PinRoot:     d.pins.ChainPath(),
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

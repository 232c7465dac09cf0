package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/balancer"
	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/control"
)

// chain keeps the XDP programs that share xlb's interface: it rebuilds the
// chain dispatcher when a member comes or goes and swaps it in with one
// bpf_link update (docs/chain-protocol.md).
type chain struct {
	mu      sync.Mutex
	log     *slog.Logger
	pipe    *dispatcher.Pipeline
	att     *dispatcher.Attachment
	pinRoot string // <pin-path>/chain
	xlbPrio int
	members []*chainMember
	prog    *ebpf.Program // the attached chain; nil while xlb_dispatch is attached alone
}

type chainMember struct {
	req        control.ChainMember // as configured, to tell a changed member on reload
	m          *dispatcher.Member
	priority   int
	continueOn []dispatcher.Verdict
}

var (
	errChainMember = errors.New("chain member")
	memberNameRE   = regexp.MustCompile(`^[a-z0-9-]{1,15}$`)
)

// newChain loads cfg's chain members and builds the chain around bal's
// pipeline; the daemon attaches entry() once everything is ready.
func newChain(cfg *config.Config, bal *balancer.Balancer, log *slog.Logger) (_ *chain, err error) {
	c := &chain{
		log:     log,
		pipe:    bal.Pipeline(),
		pinRoot: filepath.Join(cfg.PinPath, "chain"),
		xlbPrio: cfg.XLBPriority,
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	for _, m := range cfg.Chain {
		cm, err := c.load(memberRequest(m))
		if err != nil {
			return nil, err
		}
		c.members = append(c.members, cm)
	}
	if len(c.members) > 0 {
		if err := c.swap(c.members); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// load reads a member and creates its pinned maps. Priority -1 means the
// object's XDP_RUN_CONFIG, or the default.
func (c *chain) load(req control.ChainMember) (_ *chainMember, err error) {
	switch {
	case req.Name == dispatcher.PipelineName:
		return nil, fmt.Errorf("%w %s: the name of xlb's own pipeline", errChainMember, req.Name)
	case !memberNameRE.MatchString(req.Name):
		return nil, fmt.Errorf("%w %q: name is not [a-z0-9-]{1,15}", errChainMember, req.Name)
	case req.Object == "":
		return nil, fmt.Errorf("%w %s: no object", errChainMember, req.Name)
	case req.Priority < -1 || req.Priority > config.MaxPriority:
		return nil, fmt.Errorf("%w %s: priority %d out of range 0..%d", errChainMember, req.Name, req.Priority, config.MaxPriority)
	}
	if slices.ContainsFunc(c.members, func(m *chainMember) bool { return m.m.Name == req.Name }) {
		return nil, fmt.Errorf("%w %s: already in the chain", errChainMember, req.Name)
	}
	m, err := dispatcher.LoadMember(req.Name, req.Object, req.Program)
	if err != nil {
		return nil, err
	}
	cm := &chainMember{req: req, m: m, priority: config.DefaultPriority}
	switch {
	case req.Priority >= 0:
		cm.priority = req.Priority
	case m.RunConfig.HasPriority:
		cm.priority = m.RunConfig.Priority
	}
	switch {
	case req.ContinueOn != nil:
		cm.continueOn = []dispatcher.Verdict{}
		for _, s := range req.ContinueOn {
			v, err := dispatcher.ParseVerdict(s)
			if err != nil {
				return nil, fmt.Errorf("%w %s: %w", errChainMember, req.Name, err)
			}
			cm.continueOn = append(cm.continueOn, v)
		}
	case m.RunConfig.HasActions:
		cm.continueOn = append([]dispatcher.Verdict{}, m.RunConfig.ContinueOn...)
	}
	if err := m.CreateMaps(filepath.Join(c.pinRoot, req.Name)); err != nil {
		return nil, err
	}
	return cm, nil
}

// entries is the chain of members plus xlb's pipeline, in run order.
func (c *chain) entries(members []*chainMember) []dispatcher.ChainEntry {
	out := []dispatcher.ChainEntry{{Priority: c.xlbPrio}}
	for _, m := range members {
		out = append(out, dispatcher.ChainEntry{Member: m.m, Priority: m.priority, ContinueOn: m.continueOn})
	}
	dispatcher.SortChain(out)
	return out
}

// swap builds the chain of members and replaces the attached program
// with it atomically. On error the running chain is unchanged.
func (c *chain) swap(members []*chainMember) error {
	var prog *ebpf.Program
	next := c.pipe.Entry()
	if len(members) > 0 {
		var err error
		if prog, err = c.pipe.BuildChain(c.entries(members)); err != nil {
			return err
		}
		next = prog
	}
	if c.att != nil {
		if err := c.att.Replace(next); err != nil {
			if prog != nil {
				prog.Close()
			}
			return err
		}
	}
	if c.prog != nil {
		c.prog.Close()
	}
	c.prog = prog
	return nil
}

// entry is the program to attach: the chain, or xlb_dispatch alone.
func (c *chain) entry() *ebpf.Program {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.prog != nil {
		return c.prog
	}
	return c.pipe.Entry()
}

// attached tells the chain where later changes are swapped in.
func (c *chain) attached(att *dispatcher.Attachment) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.att = att
}

// Close releases the chain's program and the members' maps and pins. It
// leaves the attachment to the balancer.
func (c *chain) Close() error {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for _, m := range c.members {
		errs = append(errs, m.m.Close())
	}
	c.members = nil
	if c.prog != nil {
		c.prog.Close()
		c.prog = nil
	}
	_ = os.Remove(c.pinRoot) // only if empty
	return errors.Join(errs...)
}

func (c *chain) list() []control.ChainMember {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []control.ChainMember
	for _, e := range c.entries(c.members) {
		cont := e.ContinueOn
		if cont == nil {
			cont = dispatcher.DefaultContinueOn
		}
		cm := control.ChainMember{Name: e.Name(), Priority: e.Priority, ContinueOn: []string{}}
		for _, v := range cont {
			cm.ContinueOn = append(cm.ContinueOn, v.String())
		}
		if e.Member == nil {
			cm.Builtin = true
			cm.Program = "xlb_dispatch"
		} else {
			cm.Object, cm.Program, cm.PinPath = e.Member.Object, e.Member.Program, e.Member.PinDir()
			for _, n := range e.Member.MapNames() {
				cm.Maps = append(cm.Maps, dispatcher.PinName(n))
			}
		}
		out = append(out, cm)
	}
	return out
}

func (c *chain) add(req control.ChainMember) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	cm, err := c.load(req)
	if err != nil {
		return err
	}
	members := append(slices.Clone(c.members), cm)
	if err := c.swap(members); err != nil {
		cm.m.Close()
		return fmt.Errorf("add chain member %s: %w", req.Name, err)
	}
	c.members = members
	c.log.Info("chain member added", "name", req.Name, "object", req.Object, "program", cm.m.Program, "priority", cm.priority)
	return nil
}

func (c *chain) remove(name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if name == dispatcher.PipelineName {
		return fmt.Errorf("%w %s: xlb's own pipeline cannot be removed", errChainMember, name)
	}
	i := slices.IndexFunc(c.members, func(m *chainMember) bool { return m.m.Name == name })
	if i < 0 {
		return fmt.Errorf("%w %s: not in the chain", errChainMember, name)
	}
	members := slices.Delete(slices.Clone(c.members), i, i+1)
	if err := c.swap(members); err != nil {
		return fmt.Errorf("remove chain member %s: %w", name, err)
	}
	gone := c.members[i]
	c.members = members
	c.log.Info("chain member removed", "name", name)
	return gone.m.Close()
}

func memberRequest(m config.ChainMember) control.ChainMember {
	prio := -1
	if m.Priority != nil {
		prio = *m.Priority
	}
	return control.ChainMember{Name: m.Name, Object: m.Object, Program: m.Program, Priority: prio, ContinueOn: m.ContinueOn}
}

// reload makes the chain what a reloaded configuration says: members no
// longer listed, or changed, are removed; new and changed ones added;
// xlb's own priority updated. Unchanged members keep running (and keep
// their maps). A changed member is briefly absent between its removal
// and its new version's addition.
func (c *chain) reload(want []config.ChainMember, xlbPrio int) error {
	wanted := make(map[string]control.ChainMember, len(want))
	for _, m := range want {
		wanted[m.Name] = memberRequest(m)
	}
	var errs []error
	c.mu.Lock()
	var drop []string
	for _, m := range c.members {
		if w, ok := wanted[m.m.Name]; !ok || !sameMember(w, m.req) {
			drop = append(drop, m.m.Name)
		}
	}
	prioChanged := c.xlbPrio != xlbPrio
	c.xlbPrio = xlbPrio
	c.mu.Unlock()
	for _, name := range drop {
		errs = append(errs, c.remove(name))
	}
	for _, m := range want {
		c.mu.Lock()
		present := slices.ContainsFunc(c.members, func(x *chainMember) bool { return x.m.Name == m.Name })
		c.mu.Unlock()
		if !present {
			errs = append(errs, c.add(memberRequest(m)))
		}
	}
	if prioChanged {
		c.mu.Lock()
		errs = append(errs, c.swap(c.members))
		c.mu.Unlock()
	}
	return errors.Join(errs...)
}

func sameMember(a, b control.ChainMember) bool {
	return a.Name == b.Name && a.Object == b.Object && a.Program == b.Program && a.Priority == b.Priority &&
		slices.Equal(a.ContinueOn, b.ContinueOn) && (a.ContinueOn == nil) == (b.ContinueOn == nil)
}

// ChainList implements control.Handler.
func (d *daemon) ChainList(context.Context) ([]control.ChainMember, error) {
	return d.chain.list(), nil
}

// ChainAdd implements control.Handler.
func (d *daemon) ChainAdd(_ context.Context, m control.ChainMember) error {
	return d.chain.add(m)
}

// ChainRemove implements control.Handler.
func (d *daemon) ChainRemove(_ context.Context, name string) error {
	return d.chain.remove(name)
}

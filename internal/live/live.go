// Package live holds the changes made to xlbd's configuration through its
// control API (xlbctl backend, service, policy and chain commands), apart
// from the configuration file, so that a reload keeps them.
//
// The configuration in force is the file's (with flags and environment)
// with the live changes applied (Apply). Each change concerns one item: a
// service, a service's policy, a backend of a service, or a chain member.
// It remembers the file's version of its item when it was made; a reload
// drops the changes whose item the new file changes (Rebase): the file
// wins on the items it changes, and the live changes stay on the others.
package live

import (
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"slices"

	"github.com/xlb-project/xlb/internal/config"
)

// Errors of the changes, checked with errors.Is.
var (
	ErrNotFound  = errors.New("not found")
	ErrExists    = errors.New("already exists")
	ErrAmbiguous = errors.New("ambiguous")
	ErrRefused   = errors.New("refused")
)

// Changes are the live changes. The zero value has none. A Changes is not
// safe for concurrent use: xlbd changes a Clone and keeps it once the
// change is in force.
type Changes struct {
	seq      int
	services map[string]*serviceChange // by config.Service.Key
	policies map[string]*policyChange  // by service key
	backends map[backendKey]*backendChange
	members  map[string]*memberChange // by name
}

// change adds an item (spec), changes the file's (base) or removes it
// (spec nil).
type change[T any] struct {
	seq  int
	base *T // the file's item when the change was made; nil: none, it is added live
	spec *T
}

// clone returns a deep copy of c, copying items with cloneItem.
func (c *change[T]) clone(cloneItem func(*T) *T) *change[T] {
	return &change[T]{seq: c.seq, base: cloneItem(c.base), spec: cloneItem(c.spec)}
}

// addedLive returns copies of the items the changes in cs add live (the
// file has none such), in the order they were added; keep, if not nil,
// chooses the changes by their key.
func addedLive[K comparable, T any](cs map[K]*change[T], keep func(K) bool, cloneItem func(*T) *T) []T {
	var added []*change[T]
	for k, c := range cs {
		if c.base == nil && c.spec != nil && (keep == nil || keep(k)) {
			added = append(added, c)
		}
	}
	slices.SortFunc(added, func(a, b *change[T]) int { return a.seq - b.seq })
	out := make([]T, len(added))
	for i, c := range added {
		out[i] = *cloneItem(c.spec)
	}
	return out
}

// serviceChange adds a service (spec), or removes one (spec nil).
type serviceChange = change[config.Service]

// policyChange sets a file service's policy.
type policyChange struct {
	seq    int
	base   string // the file's policy
	policy string
}

type backendKey struct {
	service string
	addr    netip.AddrPort
}

// backendChange adds or changes a backend of a file service (spec), or
// removes one (spec nil).
type backendChange = change[config.Backend]

// memberChange adds a chain member (spec), or removes one (spec nil).
type memberChange = change[config.ChainMember]

// Clone returns a deep copy of c.
func (c *Changes) Clone() *Changes {
	out := &Changes{seq: c.seq}
	out.init()
	for k, v := range c.services {
		out.services[k] = v.clone(cloneService)
	}
	for k, v := range c.policies {
		cp := *v
		out.policies[k] = &cp
	}
	for k, v := range c.backends {
		out.backends[k] = v.clone(cloneBackend)
	}
	for k, v := range c.members {
		out.members[k] = v.clone(cloneMember)
	}
	return out
}

// Empty reports whether there is no live change.
func (c *Changes) Empty() bool {
	return len(c.services)+len(c.policies)+len(c.backends)+len(c.members) == 0
}

// init makes the zero value usable.
func (c *Changes) init() {
	if c.services == nil {
		c.services, c.policies = map[string]*serviceChange{}, map[string]*policyChange{}
		c.backends, c.members = map[backendKey]*backendChange{}, map[string]*memberChange{}
	}
}

func (c *Changes) next() int {
	c.seq++
	return c.seq
}

// Apply returns file's configuration with the changes applied (a copy:
// file is not changed). Services and backends added live come after the
// file's, in the order they were added. The result is filled in
// (config.FillIn) but not validated.
func (c *Changes) Apply(file *config.Config) *config.Config {
	out := *file
	out.Services = nil
	for i := range file.Services {
		key := file.Services[i].Key()
		if sc, ok := c.services[key]; ok {
			if sc.spec != nil {
				out.Services = append(out.Services, *cloneService(sc.spec))
			}
			continue
		}
		s := *cloneService(&file.Services[i])
		if pc, ok := c.policies[key]; ok {
			s.Policy = pc.policy
		}
		kept := s.Backends[:0]
		for _, b := range s.Backends {
			bc, ok := c.backends[backendKey{key, b.Address}]
			switch {
			case !ok:
				kept = append(kept, b)
			case bc.spec != nil:
				kept = append(kept, *cloneBackend(bc.spec))
			}
		}
		s.Backends = append(kept, addedLive(c.backends, func(k backendKey) bool { return k.service == key }, cloneBackend)...)
		out.Services = append(out.Services, s)
	}
	out.Services = append(out.Services, addedLive(c.services, nil, cloneService)...)

	out.Chain = nil
	for i, m := range file.Chain {
		if mc, ok := c.members[m.Name]; ok {
			if mc.spec != nil {
				out.Chain = append(out.Chain, *cloneMember(mc.spec))
			}
			continue
		}
		out.Chain = append(out.Chain, *cloneMember(&file.Chain[i]))
	}
	out.Chain = append(out.Chain, addedLive(c.members, nil, cloneMember)...)
	out.FillIn()
	return &out
}

// Rebase keeps the changes for a new file: a change whose item the new
// file has differently from the file it was made on is dropped (the file
// wins), and so are changes to a file service the new file no longer has.
// It returns a line for each change dropped.
func (c *Changes) Rebase(file *config.Config) []string {
	var dropped []string
	for key, sc := range c.services {
		if now := fileService(file, key); !reflect.DeepEqual(now, sc.base) {
			delete(c.services, key)
			dropped = append(dropped, fmt.Sprintf("service %s: the file changes it", key))
		}
	}
	for key, pc := range c.policies {
		now := fileService(file, key)
		if now == nil || now.Policy != pc.base {
			delete(c.policies, key)
			dropped = append(dropped, fmt.Sprintf("policy %s of service %s: the file changes the service's policy", pc.policy, key))
		}
	}
	for k, bc := range c.backends {
		svc := fileService(file, k.service)
		if svc == nil {
			delete(c.backends, k)
			dropped = append(dropped, fmt.Sprintf("backend %s of service %s: the file no longer has the service", k.addr, k.service))
			continue
		}
		if now := fileBackend(svc, k.addr); !reflect.DeepEqual(now, bc.base) {
			delete(c.backends, k)
			dropped = append(dropped, fmt.Sprintf("backend %s of service %s: the file changes it", k.addr, k.service))
		}
	}
	for name, mc := range c.members {
		if now := fileMember(file, name); !reflect.DeepEqual(now, mc.base) {
			delete(c.members, name)
			dropped = append(dropped, fmt.Sprintf("chain member %s: the file changes it", name))
		}
	}
	slices.Sort(dropped)
	return dropped
}

// Service, backend and member lookups in a configuration; nil when
// absent. They return pointers into cfg.

func fileService(cfg *config.Config, key string) *config.Service {
	for i := range cfg.Services {
		if cfg.Services[i].Key() == key {
			return &cfg.Services[i]
		}
	}
	return nil
}

func fileBackend(s *config.Service, addr netip.AddrPort) *config.Backend {
	if s == nil {
		return nil
	}
	for i := range s.Backends {
		if s.Backends[i].Address == addr {
			return &s.Backends[i]
		}
	}
	return nil
}

func fileMember(cfg *config.Config, name string) *config.ChainMember {
	for i := range cfg.Chain {
		if cfg.Chain[i].Name == name {
			return &cfg.Chain[i]
		}
	}
	return nil
}

// ResolveService finds the key of the service at vip, of protocol
// ("" when only one service has that VIP), in the configuration in force.
func ResolveService(eff *config.Config, vip netip.AddrPort, protocol string) (string, error) {
	var keys []string
	for _, s := range eff.Services {
		if s.VIP == vip && (protocol == "" || s.Protocol == protocol) {
			keys = append(keys, s.Key())
		}
	}
	switch {
	case len(keys) == 0 && protocol != "":
		return "", fmt.Errorf("service %s/%s: %w", vip, protocol, ErrNotFound)
	case len(keys) == 0:
		return "", fmt.Errorf("service %s: %w", vip, ErrNotFound)
	case len(keys) > 1:
		return "", fmt.Errorf("service %s: %w: a tcp and a udp service share it; name the protocol", vip, ErrAmbiguous)
	}
	return keys[0], nil
}

// AddBackend adds backend b to the service key.
func (c *Changes) AddBackend(file *config.Config, key string, b config.Backend) (string, error) {
	c.init()
	svc := fileService(c.Apply(file), key)
	if svc == nil {
		return "", fmt.Errorf("service %s: %w", key, ErrNotFound)
	}
	if fileBackend(svc, b.Address) != nil {
		return "", fmt.Errorf("backend %s of service %s: %w (change its weight with set-weight)", b.Address, key, ErrExists)
	}
	what := fmt.Sprintf("service %s: backend %s added with weight %d", key, b.Address, b.Weight)
	if sc := c.services[key]; sc != nil {
		sc.spec.Backends = append(sc.spec.Backends, b)
		return what, nil
	}
	c.setBackend(file, key, b.Address, &b)
	return what, nil
}

// RemoveBackend removes the backend at addr from the service key; a
// service keeps at least one backend.
func (c *Changes) RemoveBackend(file *config.Config, key string, addr netip.AddrPort) (string, error) {
	c.init()
	svc := fileService(c.Apply(file), key)
	if svc == nil {
		return "", fmt.Errorf("service %s: %w", key, ErrNotFound)
	}
	if fileBackend(svc, addr) == nil {
		return "", fmt.Errorf("backend %s of service %s: %w", addr, key, ErrNotFound)
	}
	if len(svc.Backends) == 1 {
		return "", fmt.Errorf("backend %s of service %s: %w: it is the service's last backend; remove the service, or drain the backend", addr, key, ErrRefused)
	}
	what := fmt.Sprintf("service %s: backend %s removed", key, addr)
	if sc := c.services[key]; sc != nil {
		sc.spec.Backends = slices.DeleteFunc(sc.spec.Backends, func(b config.Backend) bool { return b.Address == addr })
		return what, nil
	}
	c.setBackend(file, key, addr, nil)
	return what, nil
}

// SetWeight sets the weight of the backend at addr of the service key; 0
// drains it.
func (c *Changes) SetWeight(file *config.Config, key string, addr netip.AddrPort, weight uint32) (string, error) {
	c.init()
	svc := fileService(c.Apply(file), key)
	if svc == nil {
		return "", fmt.Errorf("service %s: %w", key, ErrNotFound)
	}
	cur := fileBackend(svc, addr)
	if cur == nil {
		return "", fmt.Errorf("backend %s of service %s: %w", addr, key, ErrNotFound)
	}
	what := fmt.Sprintf("service %s: backend %s weight %d -> %d", key, addr, cur.Weight, weight)
	if sc := c.services[key]; sc != nil {
		fileBackend(sc.spec, addr).Weight = weight
		return what, nil
	}
	b := *cloneBackend(cur)
	b.Weight = weight
	c.setBackend(file, key, addr, &b)
	return what, nil
}

// setBackend records backend addr of the file service key as spec (nil:
// removed), or forgets the change when it leaves the file's backend as it
// is.
func (c *Changes) setBackend(file *config.Config, key string, addr netip.AddrPort, spec *config.Backend) {
	k := backendKey{key, addr}
	bc, ok := c.backends[k]
	if !ok {
		bc = &backendChange{seq: c.next(), base: cloneBackend(fileBackend(fileService(file, key), addr))}
		c.backends[k] = bc
	}
	bc.spec = cloneBackend(spec)
	if reflect.DeepEqual(bc.spec, bc.base) {
		delete(c.backends, k)
	}
}

// AddService adds service s, which must not exist.
func (c *Changes) AddService(file *config.Config, s config.Service) (string, error) {
	c.init()
	key := s.Key()
	if fileService(c.Apply(file), key) != nil {
		return "", fmt.Errorf("service %s: %w", key, ErrExists)
	}
	c.dropServiceItems(key)
	sc, ok := c.services[key]
	if !ok {
		sc = &serviceChange{seq: c.next(), base: cloneService(fileService(file, key))}
		c.services[key] = sc
	}
	sc.spec = cloneService(&s)
	if reflect.DeepEqual(sc.spec, sc.base) {
		delete(c.services, key)
	}
	return fmt.Sprintf("service %s added with %d backends, policy %s", key, len(s.Backends), s.Policy), nil
}

// RemoveService removes the service key.
func (c *Changes) RemoveService(file *config.Config, key string) (string, error) {
	c.init()
	if fileService(c.Apply(file), key) == nil {
		return "", fmt.Errorf("service %s: %w", key, ErrNotFound)
	}
	c.dropServiceItems(key)
	base := fileService(file, key)
	if base == nil {
		delete(c.services, key) // added live: forgotten
	} else {
		c.services[key] = &serviceChange{seq: c.next(), base: cloneService(base)}
	}
	return fmt.Sprintf("service %s removed", key), nil
}

// dropServiceItems forgets the changes of a service's policy and
// backends.
func (c *Changes) dropServiceItems(key string) {
	delete(c.policies, key)
	for k := range c.backends {
		if k.service == key {
			delete(c.backends, k)
		}
	}
}

// SetPolicy sets the policy of the service key.
func (c *Changes) SetPolicy(file *config.Config, key, policy string) (string, error) {
	c.init()
	svc := fileService(c.Apply(file), key)
	if svc == nil {
		return "", fmt.Errorf("service %s: %w", key, ErrNotFound)
	}
	what := fmt.Sprintf("service %s: policy %s -> %s", key, svc.Policy, policy)
	if sc := c.services[key]; sc != nil {
		sc.spec.Policy = policy
		return what, nil
	}
	base := fileService(file, key).Policy
	if policy == base {
		delete(c.policies, key)
		return what, nil
	}
	pc, ok := c.policies[key]
	if !ok {
		pc = &policyChange{seq: c.next(), base: base}
		c.policies[key] = pc
	}
	pc.policy = policy
	return what, nil
}

// AddMember adds chain member m, which must not exist.
func (c *Changes) AddMember(file *config.Config, m config.ChainMember) (string, error) {
	c.init()
	if fileMember(c.Apply(file), m.Name) != nil {
		return "", fmt.Errorf("chain member %s: %w", m.Name, ErrExists)
	}
	mc, ok := c.members[m.Name]
	if !ok {
		mc = &memberChange{seq: c.next(), base: cloneMember(fileMember(file, m.Name))}
		c.members[m.Name] = mc
	}
	mc.spec = cloneMember(&m)
	if reflect.DeepEqual(mc.spec, mc.base) {
		delete(c.members, m.Name)
	}
	return fmt.Sprintf("chain member %s added (%s)", m.Name, m.Object), nil
}

// RemoveMember removes chain member name.
func (c *Changes) RemoveMember(file *config.Config, name string) (string, error) {
	c.init()
	if fileMember(c.Apply(file), name) == nil {
		return "", fmt.Errorf("chain member %s: %w", name, ErrNotFound)
	}
	base := fileMember(file, name)
	if base == nil {
		delete(c.members, name)
	} else {
		c.members[name] = &memberChange{seq: c.next(), base: cloneMember(base)}
	}
	return fmt.Sprintf("chain member %s removed", name), nil
}

// LiveService reports whether the service key was added or had its policy
// set by a live change.
func (c *Changes) LiveService(key string) bool {
	sc := c.services[key]
	return (sc != nil && sc.spec != nil) || c.policies[key] != nil
}

// LiveBackend reports whether backend addr of the service key was added
// or changed by a live change (or belongs to a service added live).
func (c *Changes) LiveBackend(key string, addr netip.AddrPort) bool {
	if sc := c.services[key]; sc != nil && sc.spec != nil {
		return true
	}
	bc := c.backends[backendKey{key, addr}]
	return bc != nil && bc.spec != nil
}

// LiveMember reports whether chain member name was added by a live
// change.
func (c *Changes) LiveMember(name string) bool {
	mc := c.members[name]
	return mc != nil && mc.spec != nil
}

// List describes every live change, oldest first.
func (c *Changes) List() []string {
	type line struct {
		seq  int
		text string
	}
	var out []line
	for key, sc := range c.services {
		if sc.spec == nil {
			out = append(out, line{sc.seq, "service " + key + " removed"})
		} else {
			out = append(out, line{sc.seq, "service " + key + " added"})
		}
	}
	for key, pc := range c.policies {
		out = append(out, line{pc.seq, fmt.Sprintf("service %s: policy %s", key, pc.policy)})
	}
	for k, bc := range c.backends {
		switch {
		case bc.spec == nil:
			out = append(out, line{bc.seq, fmt.Sprintf("service %s: backend %s removed", k.service, k.addr)})
		case bc.base == nil:
			out = append(out, line{bc.seq, fmt.Sprintf("service %s: backend %s added with weight %d", k.service, k.addr, bc.spec.Weight)})
		default:
			out = append(out, line{bc.seq, fmt.Sprintf("service %s: backend %s weight %d", k.service, k.addr, bc.spec.Weight)})
		}
	}
	for name, mc := range c.members {
		if mc.spec == nil {
			out = append(out, line{mc.seq, "chain member " + name + " removed"})
		} else {
			out = append(out, line{mc.seq, "chain member " + name + " added"})
		}
	}
	slices.SortFunc(out, func(a, b line) int { return a.seq - b.seq })
	texts := make([]string, len(out))
	for i, l := range out {
		texts[i] = l.text
	}
	return texts
}

func cloneService(s *config.Service) *config.Service {
	out := clonePtr(s)
	if out != nil {
		out.Backends = make([]config.Backend, len(s.Backends))
		for i := range s.Backends {
			out.Backends[i] = *cloneBackend(&s.Backends[i])
		}
		out.SourceAddresses = slices.Clone(s.SourceAddresses)
		out.ManageVIP = clonePtr(s.ManageVIP)
		out.Health = cloneHealth(s.Health)
	}
	return out
}

func cloneBackend(b *config.Backend) *config.Backend {
	out := clonePtr(b)
	if out != nil {
		out.Health = cloneHealth(b.Health)
	}
	return out
}

func cloneHealth(h *config.Health) *config.Health {
	out := clonePtr(h)
	if out != nil {
		out.ResetEstablished = clonePtr(h.ResetEstablished)
	}
	return out
}

func cloneMember(m *config.ChainMember) *config.ChainMember {
	out := clonePtr(m)
	if out != nil {
		out.Priority = clonePtr(m.Priority)
		out.ContinueOn = slices.Clone(m.ContinueOn)
	}
	return out
}

// clonePtr returns a copy of *p in memory of its own, or nil if p is nil.
func clonePtr[T any](p *T) *T {
	if p == nil {
		return nil
	}
	v := *p
	return &v
}

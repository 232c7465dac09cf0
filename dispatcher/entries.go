package dispatcher

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// Reading back what the maps hold, so that a daemon that adopts pinned
// maps can take up the services, backends and tables in force.

// ServiceEntry is a service as the data path holds it.
type ServiceEntry struct {
	VIP     netip.AddrPort
	Proto   uint8 // TCP or UDP
	ID      uint32
	Sources []int // indexes of its source addresses
	// Mode and Table are its selection table in force (backend ids);
	// Table is nil when it has none.
	Mode  Mode
	Table []uint32
}

// ServiceEntries lists the services in xlb_services and xlb_services6
// with their source addresses and selection tables.
func (p *Pipeline) ServiceEntries() ([]ServiceEntry, error) {
	var (
		k   xlbXlbVip
		k6  xlbXlbVip6
		v   xlbXlbService
		all []ServiceEntry
	)
	it := p.objs.XlbServices.Iterate()
	for it.Next(&k, &v) {
		all = append(all, ServiceEntry{VIP: netip.AddrPortFrom(addrFromBE(k.Addr), portBE(k.Port)), Proto: k.Proto, ID: v.Id})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read services: %w", err)
	}
	it = p.objs.XlbServices6.Iterate()
	for it.Next(&k6, &v) {
		all = append(all, ServiceEntry{VIP: netip.AddrPortFrom(addr6FromWords(k6.Addr), portBE(k6.Port)), Proto: k6.Proto, ID: v.Id})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read IPv6 services: %w", err)
	}
	out := all[:0]
	for _, e := range all {
		var mask uint32
		if err := p.objs.XlbSvcSrc.Lookup(e.ID, &mask); err != nil {
			return nil, fmt.Errorf("read source addresses of service %s: %w", e.VIP, err)
		}
		for i := range MaxSources {
			if mask&(1<<i) != 0 {
				e.Sources = append(e.Sources, i)
			}
		}
		var err error
		if e.Mode, e.Table, err = p.selection(e.ID); err != nil {
			return nil, fmt.Errorf("read selection table of service %s: %w", e.VIP, err)
		}
		out = append(out, e)
	}
	return out, nil
}

// selection reads a service's selection table in force.
func (p *Pipeline) selection(svc uint32) (Mode, []uint32, error) {
	var id uint32
	err := p.objs.XlbSel.Lookup(svc, &id)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, nil, nil
	}
	if err != nil {
		return 0, nil, err
	}
	inner, err := ebpf.NewMapFromID(ebpf.MapID(id))
	if err != nil {
		return 0, nil, err
	}
	defer inner.Close()
	var hdr uint32
	if err := inner.Lookup(uint32(0), &hdr); err != nil {
		return 0, nil, err
	}
	n := int(hdr >> 8)
	if n == 0 || n > MaxTable {
		return 0, nil, fmt.Errorf("%w: header %#x", ErrBadTable, hdr)
	}
	keys := make([]uint32, n+1)
	vals := make([]uint32, n+1)
	var cursor ebpf.MapBatchCursor
	got, err := inner.BatchLookup(&cursor, keys, vals, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, nil, err
	}
	if got < n+1 {
		return 0, nil, fmt.Errorf("%w: %d of %d entries read", ErrBadTable, got, n+1)
	}
	return Mode(hdr & 0xff), vals[1:], nil
}

// BackendEntry is a backend id as the data path holds it.
type BackendEntry struct {
	ID      uint32
	Address netip.AddrPort
	Weight  uint16 // 0: it takes no new connections (retired)
	Service uint32 // the id of the service it was allocated for
}

// BackendEntries lists the backend ids in use: those SetBackendOwner gave
// a service and FreeBackend has not freed.
func (p *Pipeline) BackendEntries() ([]BackendEntry, error) {
	owners := make([]uint32, MaxBackends)
	keys := make([]uint32, MaxBackends)
	var cursor ebpf.MapBatchCursor
	n, err := p.owner.BatchLookup(&cursor, keys, owners, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("read backend owners: %w", err)
	}
	var out []BackendEntry
	for i := range n {
		if owners[i] == 0 {
			continue
		}
		// SetBackend leaves the other family's entry of an id zero.
		var (
			b  xlbXlbBackend
			b6 xlbXlbBackend6
		)
		if err := p.objs.XlbBackends.Lookup(keys[i], &b); err != nil {
			return nil, fmt.Errorf("read backend %d: %w", keys[i], err)
		}
		e := BackendEntry{ID: keys[i], Address: netip.AddrPortFrom(addrFromBE(b.Addr), portBE(b.Port)), Weight: b.Weight, Service: owners[i] - 1}
		if b.Port == 0 {
			if err := p.objs.XlbBackends6.Lookup(keys[i], &b6); err != nil {
				return nil, fmt.Errorf("read backend %d: %w", keys[i], err)
			}
			e.Address, e.Weight = netip.AddrPortFrom(addr6FromWords(b6.Addr), portBE(b6.Port)), b6.Weight
		}
		out = append(out, e)
	}
	return out, nil
}

// SetBackendOwner records that backend id id belongs to service svc.
func (p *Pipeline) SetBackendOwner(id, svc uint32) error {
	if id >= uint32(MaxBackends) {
		return fmt.Errorf("backend %d: %w", id, ErrOutOfRange)
	}
	if err := p.owner.Put(id, svc+1); err != nil {
		return fmt.Errorf("record owner of backend %d: %w", id, err)
	}
	return nil
}

// FreeBackend records that backend id id is free again.
func (p *Pipeline) FreeBackend(id uint32) error {
	if id >= uint32(MaxBackends) {
		return fmt.Errorf("backend %d: %w", id, ErrOutOfRange)
	}
	if err := p.owner.Put(id, uint32(0)); err != nil {
		return fmt.Errorf("free backend %d: %w", id, err)
	}
	return nil
}

// Package state keeps what one xlbd leaves for the next in its pin
// directory (pin-path, on a bpffs): the data path's pinned maps and XDP
// link (dispatcher), the chain members' maps (internal/chain, under
// chain/) and the host record, a pinned map of what xlbd changed on the
// host: the addresses it added to the interface, the forwarding sysctl's
// value before it changed it, whether it installed the VIP filter, the
// interface and the network namespace.
//
// Open finds what an earlier run left and whether this build can adopt it
// (dispatcher.ReadPinned checks the layout); it never wipes state it
// cannot adopt unless told to (Options.Fresh). Cleanup removes everything
// an xlbd may have left, for `xlbd cleanup` after a crash.
package state

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"github.com/cilium/ebpf"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/host"
	"github.com/xlb-project/xlb/internal/vipfilter"
)

// RecordPin is the host record's file name under the pin path.
const RecordPin = "xlb_host"

// ChainDir is where chain members' maps are pinned, under the pin path.
const ChainDir = "chain"

// Errors of Open.
var (
	// ErrOtherNetns: the state was left by an xlbd in another network
	// namespace.
	ErrOtherNetns = errors.New("pinned state belongs to another network namespace")
)

// FreshHint is the way out of state this xlbd cannot adopt.
const FreshHint = "to start afresh, dropping every established connection, run `xlbd cleanup` (or start xlbd with --fresh-state); to keep the connections, run an xlbd whose layout and sizes match the pinned state"

// Record kinds: the key of the host record is {kind, value}.
const (
	kindAddress    = 1 // {addr, 16 bytes, IPv4 mapped} -> 1: an address xlbd added
	kindForwarding = 2 // {family: 0 IPv4, 1 IPv6} -> the forwarding sysctl's value before xlbd set it, as a byte
	kindIfindex    = 3 // {0} -> the interface index
	kindNetns      = 4 // {0} -> the network namespace's inode
	kindFilter     = 5 // {0} -> 1: the VIP filter is installed
)

type recordKey struct {
	Kind  uint32
	Value [16]byte
}

func recordSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: RecordPin, Type: ebpf.Hash, KeySize: 20, ValueSize: 8, MaxEntries: 4096}
}

// Record is what the host record holds.
type Record struct {
	Ifindex    int
	Netns      uint64
	Addresses  []netip.Addr // added by xlbd, in address order
	Forwarding [2]string    // the forwarding sysctls' values (IPv4, IPv6) before xlbd set them; "" if unchanged
	Filter     bool         // the VIP filter is installed
}

// Options configure Open.
type Options struct {
	// Fresh removes what an earlier run left (as Cleanup does) instead of
	// adopting it.
	Fresh  bool
	Logger *slog.Logger
}

// Dir is an xlbd's pin directory.
type Dir struct {
	path   string
	log    *slog.Logger
	rec    *ebpf.Map
	found  Record
	pinned *dispatcher.Pinned
}

// Open opens the pin directory path (creating it), reads what an earlier
// run left there and decides: adopt it (Pinned is not nil), or start
// afresh (nothing was there, an incomplete start left it, or opts.Fresh
// removed it). State of another layout or network namespace is refused
// with an error that says the way out; nothing is removed then.
func Open(ctx context.Context, path string, opts Options) (_ *Dir, err error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	d := &Dir{path: path, log: opts.Logger}
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory: %w", err)
	}
	netns, err := netnsInode()
	if err != nil {
		return nil, err
	}
	rec, err := ReadRecord(path)
	if err != nil {
		return nil, err
	}
	if rec != nil && rec.Netns != 0 && rec.Netns != netns {
		return nil, fmt.Errorf("%s: %w (inode %d, this is %d): give each xlbd its own pin-path, or run `xlbd cleanup` in that namespace (nsenter --net=...)",
			path, ErrOtherNetns, rec.Netns, netns)
	}
	switch pinned, err := dispatcher.ReadPinned(path); {
	case opts.Fresh:
		if err == nil || rec != nil || leftovers(path) {
			d.log.Warn("--fresh-state: removing the pinned state, established connections are dropped", "pin_path", path)
			if _, err := cleanup(ctx, path, d.log, true); err != nil {
				return nil, err
			}
		}
	case err == nil:
		d.pinned = pinned
		if rec != nil {
			d.found = *rec
		}
	case errors.Is(err, dispatcher.ErrNoState):
		if rec != nil || leftovers(path) {
			d.log.Warn("removing what an incomplete start left in the pin directory", "pin_path", path)
			if _, err := cleanup(ctx, path, d.log, true); err != nil {
				return nil, err
			}
		}
	case errors.Is(err, dispatcher.ErrLayout):
		return nil, fmt.Errorf("adopt %s: %w\n%s", path, err, FreshHint)
	default:
		return nil, fmt.Errorf("adopt %s: %w; %s", path, err, FreshHint)
	}
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory: %w", err)
	}
	if d.rec, err = openRecord(path); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			d.rec.Close()
		}
	}()
	if err := d.put(kindNetns, 0, netns); err != nil {
		return nil, err
	}
	return d, nil
}

// leftovers tells whether path holds anything but the secrets pin.
func leftovers(path string) bool {
	ents, _ := os.ReadDir(path)
	return slices.ContainsFunc(ents, func(e os.DirEntry) bool { return e.Name() != dispatcher.SecretsPin })
}

// Path is the pin directory.
func (d *Dir) Path() string { return d.path }

// ChainPath is where chain members' maps are pinned.
func (d *Dir) ChainPath() string { return filepath.Join(d.path, ChainDir) }

// Pinned is the state to adopt, or nil for a fresh start.
func (d *Dir) Pinned() *dispatcher.Pinned { return d.pinned }

// Found is what the host record held when Open adopted the state.
func (d *Dir) Found() Record { return d.found }

// AddressAdded records an address added to the interface (host.Recorder).
func (d *Dir) AddressAdded(a netip.Addr) error { return d.putKey(addrKey(a), 1) }

// AddressRemoved records that an address is gone (host.Recorder).
func (d *Dir) AddressRemoved(a netip.Addr) error { return d.delKey(addrKey(a)) }

// ForwardingChanged records a family's (0 IPv4, 1 IPv6) forwarding
// sysctl's value before xlbd set it; "" records that it was restored
// (host.Recorder).
func (d *Dir) ForwardingChanged(fam int, prev string) error {
	if fam != 0 && fam != 1 {
		return fmt.Errorf("record forwarding: family %d", fam)
	}
	if prev == "" {
		return d.del(kindForwarding, uint32(fam))
	}
	if len(prev) != 1 {
		return fmt.Errorf("record forwarding: value %q is not one character", prev)
	}
	return d.put(kindForwarding, uint32(fam), uint64(prev[0]))
}

// SetIface records the interface.
func (d *Dir) SetIface(ifindex int) error { return d.put(kindIfindex, 0, uint64(ifindex)) }

// FilterInstalled records whether the VIP filter is installed.
func (d *Dir) FilterInstalled(on bool) error {
	if on {
		return d.put(kindFilter, 0, 1)
	}
	return d.del(kindFilter, 0)
}

// numKey is the key of a record whose value is a number.
func numKey(kind, v uint32) recordKey {
	k := recordKey{Kind: kind}
	binary.LittleEndian.PutUint32(k.Value[:], v)
	return k
}

func (d *Dir) put(kind, v uint32, val uint64) error {
	return d.putKey(numKey(kind, v), val)
}

func (d *Dir) putKey(k recordKey, val uint64) error {
	if err := d.rec.Put(&k, val); err != nil {
		return fmt.Errorf("write host record: %w", err)
	}
	return nil
}

func (d *Dir) del(kind, v uint32) error {
	return d.delKey(numKey(kind, v))
}

func (d *Dir) delKey(k recordKey) error {
	if err := d.rec.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("write host record: %w", err)
	}
	return nil
}

// Close lets the directory go; everything pinned stays.
func (d *Dir) Close() error {
	if d.rec != nil {
		d.rec.Close()
		d.rec = nil
	}
	return nil
}

// Remove removes the host record and the pin directory, once the data
// path, the chain and the host changes are gone (a full stop). The
// secrets pin (dispatcher.SecretsPin) stays, so that the next xlbd on this
// path draws the same ISNs, and other files in the directory are left:
// the directory stays with them.
func (d *Dir) Remove() error {
	d.Close()
	var errs []error
	errs = append(errs, dispatcher.RemovePins(d.path))
	if err := os.Remove(filepath.Join(d.path, RecordPin)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove host record: %w", err))
	}
	_ = os.Remove(d.ChainPath()) // only if empty
	_ = os.Remove(d.path)
	return errors.Join(errs...)
}

func openRecord(path string) (*ebpf.Map, error) {
	file := filepath.Join(path, RecordPin)
	m, err := ebpf.LoadPinnedMap(file, nil)
	if err == nil {
		if err := recordSpec().Compatible(m); err != nil {
			m.Close()
			return nil, fmt.Errorf("open host record %s: %w", file, err)
		}
		return m, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open host record %s: %w", file, err)
	}
	if m, err = ebpf.NewMap(recordSpec()); err != nil {
		return nil, fmt.Errorf("create host record: %w", err)
	}
	if err := m.Pin(file); err != nil {
		m.Close()
		return nil, fmt.Errorf("pin host record: %w", err)
	}
	return m, nil
}

// ReadRecord reads the host record pinned under path, or returns nil when
// there is none.
func ReadRecord(path string) (*Record, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(path, RecordPin), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read host record: %w", err)
	}
	defer m.Close()
	r := &Record{}
	var (
		k recordKey
		v uint64
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		switch k.Kind {
		case kindAddress:
			r.Addresses = append(r.Addresses, netip.AddrFrom16(k.Value).Unmap())
		case kindForwarding:
			if fam := binary.LittleEndian.Uint32(k.Value[:]); fam < 2 {
				r.Forwarding[fam] = string([]byte{byte(v)})
			}
		case kindIfindex:
			r.Ifindex = int(v)
		case kindNetns:
			r.Netns = v
		case kindFilter:
			r.Filter = v != 0
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read host record: %w", err)
	}
	slices.SortFunc(r.Addresses, netip.Addr.Compare)
	return r, nil
}

// addrKey is the key of an added address: its 16 bytes, an IPv4 address
// mapped.
func addrKey(a netip.Addr) recordKey { return recordKey{Kind: kindAddress, Value: a.As16()} }

// netnsInode identifies the calling thread's network namespace.
func netnsInode() (uint64, error) {
	fi, err := os.Stat("/proc/thread-self/ns/net")
	if err != nil {
		return 0, fmt.Errorf("identify network namespace: %w", err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino, nil
}

// Cleanup removes everything an xlbd may have left under path and on the
// host, whether it exited keeping its data path or crashed: it detaches
// the pinned XDP link, removes the addresses the host record lists and
// restores the forwarding sysctl, removes the VIP filter, and removes the
// chain members' pins, the data path's pins, the host record, the
// secrets and the directory. It must run in the network namespace of the
// xlbd that left the state. It returns what it did, one line each.
func Cleanup(ctx context.Context, path string, log *slog.Logger) ([]string, error) {
	return cleanup(ctx, path, log, false)
}

// cleanup is Cleanup; with keepSecrets it leaves the secrets pin (and the
// directory with it), as Open does when it starts afresh.
func cleanup(ctx context.Context, path string, log *slog.Logger, keepSecrets bool) ([]string, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rec, err := ReadRecord(path)
	if err != nil {
		return nil, err
	}
	if rec != nil && rec.Netns != 0 {
		netns, err := netnsInode()
		if err != nil {
			return nil, err
		}
		if rec.Netns != netns {
			return nil, fmt.Errorf("%s: %w (inode %d, this is %d): run xlbd cleanup in that namespace (nsenter --net=...)", path, ErrOtherNetns, rec.Netns, netns)
		}
	}
	var (
		done []string
		errs []error
	)
	note := func(s string, args ...any) {
		done = append(done, fmt.Sprintf(s, args...))
		log.Info("cleanup: " + fmt.Sprintf(s, args...))
	}
	if ok, err := dispatcher.DetachPinned(path); err != nil {
		errs = append(errs, err)
	} else if ok {
		note("detached the pinned XDP link")
	}
	if rec != nil && rec.Ifindex != 0 {
		h, err := host.OpenIndex(rec.Ifindex)
		switch {
		case err != nil && (len(rec.Addresses) > 0 || rec.Forwarding != [2]string{} || rec.Filter):
			errs = append(errs, fmt.Errorf("undo host changes: %w", err))
		case err == nil:
			if err := h.Adopt(rec.Addresses, rec.Forwarding); err != nil {
				errs = append(errs, err)
			}
			added := h.Added()
			if err := h.Close(); err != nil {
				errs = append(errs, err)
			} else {
				for _, a := range added {
					note("removed address %s from %s", netip.PrefixFrom(a, a.BitLen()), h.Name())
				}
				for fam, prev := range rec.Forwarding {
					if prev != "" {
						note("restored net.ipv%s.conf.%s.forwarding to %s", [2]string{"4", "6"}[fam], h.Name(), prev)
					}
				}
			}
			if rec.Filter {
				table := vipfilter.Table(h.Name())
				if err := vipfilter.Remove(ctx, table); err != nil {
					errs = append(errs, err)
				} else {
					note("removed the VIP filter (nftables table inet %s)", table)
				}
			}
		}
	}
	chainDir := filepath.Join(path, ChainDir)
	if _, err := os.Stat(chainDir); err == nil {
		if err := os.RemoveAll(chainDir); err != nil {
			errs = append(errs, fmt.Errorf("remove chain pins: %w", err))
		} else {
			note("removed the chain members' pins under %s", chainDir)
		}
	}
	if leftovers(path) {
		if err := dispatcher.RemovePins(path); err != nil {
			errs = append(errs, err)
		}
		if err := os.Remove(filepath.Join(path, RecordPin)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove host record: %w", err))
		}
		note("removed the pins under %s", path)
	}
	if _, err := os.Stat(filepath.Join(path, dispatcher.SecretsPin)); err == nil {
		if keepSecrets {
			return done, errors.Join(errs...)
		}
		if err := dispatcher.RemoveSecrets(path); err != nil {
			errs = append(errs, err)
		} else {
			note("removed the ISN and cookie secrets (%s)", dispatcher.SecretsPin)
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove pin directory (not empty: files xlb did not make?): %w", err))
	}
	return done, errors.Join(errs...)
}

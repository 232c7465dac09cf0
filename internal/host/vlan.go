package host

import (
	"bytes"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VLANOffloads are the receive offloads that take a VLAN tag out of the
// frame into the packet's metadata, where XDP does not see it (ethtool's
// rx-vlan-offload, and its 802.1ad twin).
var VLANOffloads = []string{"rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"}

// ErrVLANOffloadFixed: the driver does not let a VLAN receive offload be
// turned off, so tagged frames reach XDP without their tag.
var ErrVLANOffloadFixed = errors.New("vlan receive offload cannot be turned off")

// KeepVLANTags turns off the interface's VLAN receive offloads
// (VLANOffloads) that are on, so that a NIC leaves 802.1Q and 802.1ad tags
// in the frame, where xlb's parser sees them and passes the frame to the
// kernel instead of balancing it without its tag. Close turns on again
// what it turned off. It returns the offloads it turned off; an offload
// that is on and that the driver does not let change is left on and
// reported with ErrVLANOffloadFixed (the others are still turned off).
func (h *Iface) KeepVLANTags() ([]string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open ethtool socket: %w", err)
	}
	defer unix.Close(fd)
	et := &ethtool{fd: fd, name: h.name}
	bits, err := et.featureBits(VLANOffloads)
	if err != nil {
		return nil, err
	}
	feats, err := et.features()
	if err != nil {
		return nil, err
	}
	var off, fixed []string
	for i, name := range VLANOffloads {
		bit, ok := bits[name]
		if !ok || !feats.active(bit) {
			continue
		}
		if !feats.changeable(bit) {
			fixed = append(fixed, VLANOffloads[i])
			continue
		}
		if err := et.setFeature(bit, false); err != nil {
			return off, fmt.Errorf("turn off %s on %s: %w", name, h.name, err)
		}
		h.vlanOff = append(h.vlanOff, bit)
		off = append(off, name)
	}
	if len(fixed) > 0 {
		return off, fmt.Errorf("%s on %s: %w", fixed, h.name, ErrVLANOffloadFixed)
	}
	return off, nil
}

// restoreVLAN turns on again the offloads KeepVLANTags turned off; h.mu is
// held.
func (h *Iface) restoreVLAN() error {
	if len(h.vlanOff) == 0 {
		return nil
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open ethtool socket: %w", err)
	}
	defer unix.Close(fd)
	et := &ethtool{fd: fd, name: h.name}
	var errs []error
	for _, bit := range h.vlanOff {
		if err := et.setFeature(bit, true); err != nil {
			errs = append(errs, fmt.Errorf("restore vlan receive offload on %s: %w", h.name, err))
		}
	}
	h.vlanOff = nil
	return errors.Join(errs...)
}

// The ethtool ioctl interface for device features (linux/ethtool.h).
const (
	ethtoolGSTRINGS   = 0x1b
	ethtoolGSSETINFO  = 0x37
	ethtoolGFEATURES  = 0x3a
	ethtoolSFEATURES  = 0x3b
	ethSSFeatures     = 4
	ethGStringLen     = 32
	ethtoolFeatureMax = 8 // blocks of 32 features; the kernel has about 70
)

type ethtool struct {
	fd    int
	name  string
	words uint32 // feature blocks the kernel has (ETHTOOL_DEV_FEATURE_WORDS), learnt by features
}

// ioctl runs SIOCETHTOOL with data as ifr_data.
func (e ethtool) ioctl(data unsafe.Pointer) error {
	var ifr struct {
		name [unix.IFNAMSIZ]byte
		data unsafe.Pointer
		_    [24 - unsafe.Sizeof(unsafe.Pointer(nil))]byte // struct ifreq is 40 bytes
	}
	copy(ifr.name[:unix.IFNAMSIZ-1], e.name)
	ifr.data = data
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(e.fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
	if errno != 0 {
		return errno
	}
	return nil
}

// featureBits finds the bit numbers of named features.
func (e ethtool) featureBits(names []string) (map[string]int, error) {
	var info struct {
		cmd, reserved uint32
		mask          uint64
		count         uint32
	}
	info.cmd, info.mask = ethtoolGSSETINFO, 1<<ethSSFeatures
	if err := e.ioctl(unsafe.Pointer(&info)); err != nil {
		return nil, fmt.Errorf("read feature names of %s: %w", e.name, err)
	}
	n := int(info.count)
	if info.mask == 0 || n == 0 || n > 32*ethtoolFeatureMax {
		return nil, fmt.Errorf("read feature names of %s: %d features", e.name, n)
	}
	buf := make([]byte, 12+n*ethGStringLen)
	*(*[3]uint32)(unsafe.Pointer(&buf[0])) = [3]uint32{ethtoolGSTRINGS, ethSSFeatures, uint32(n)}
	if err := e.ioctl(unsafe.Pointer(&buf[0])); err != nil {
		return nil, fmt.Errorf("read feature names of %s: %w", e.name, err)
	}
	out := map[string]int{}
	for i := range n {
		s := buf[12+i*ethGStringLen : 12+(i+1)*ethGStringLen]
		if j := bytes.IndexByte(s, 0); j >= 0 {
			s = s[:j]
		}
		for _, want := range names {
			if string(s) == want {
				out[want] = i
			}
		}
	}
	return out, nil
}

// featureState is struct ethtool_gfeatures' blocks.
type featureState [ethtoolFeatureMax]struct{ available, requested, active, neverChanged uint32 }

func (f *featureState) active(bit int) bool     { return f[bit/32].active&(1<<(bit%32)) != 0 }
func (f *featureState) changeable(bit int) bool { return f[bit/32].available&(1<<(bit%32)) != 0 }

func (e *ethtool) features() (*featureState, error) {
	var req struct {
		cmd, size uint32
		blocks    featureState
	}
	req.cmd, req.size = ethtoolGFEATURES, ethtoolFeatureMax
	if err := e.ioctl(unsafe.Pointer(&req)); err != nil {
		return nil, fmt.Errorf("read features of %s: %w", e.name, err)
	}
	if req.size == 0 || req.size > ethtoolFeatureMax {
		return nil, fmt.Errorf("read features of %s: %d blocks", e.name, req.size)
	}
	e.words = req.size
	return &req.blocks, nil
}

// setFeature asks for one feature on or off and checks that it took.
func (e *ethtool) setFeature(bit int, on bool) error {
	if e.words == 0 {
		if _, err := e.features(); err != nil {
			return err
		}
	}
	if uint32(bit/32) >= e.words {
		return fmt.Errorf("feature %d of %s: beyond the kernel's %d blocks", bit, e.name, e.words)
	}
	var req struct {
		cmd, size uint32
		blocks    [ethtoolFeatureMax]struct{ valid, requested uint32 }
	}
	req.cmd, req.size = ethtoolSFEATURES, e.words
	req.blocks[bit/32].valid = 1 << (bit % 32)
	if on {
		req.blocks[bit/32].requested = 1 << (bit % 32)
	}
	if err := e.ioctl(unsafe.Pointer(&req)); err != nil {
		return err
	}
	f, err := e.features()
	if err != nil {
		return err
	}
	if f.active(bit) != on {
		return fmt.Errorf("feature %d of %s is still %v", bit, e.name, !on)
	}
	return nil
}

package testnet

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Legacy ethtool commands (linux/ethtool.h). ETHTOOL_STXCSUM changes the
// same feature bits as `ethtool -K IF tx on|off`.
const (
	ethtoolGTXCSUM = 0x16
	ethtoolSTXCSUM = 0x17
)

type ethtoolValue struct {
	cmd  uint32
	data uint32
}

// ifreqData is struct ifreq with ifr_data, laid out as in x/sys/unix.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [16 - unsafe.Sizeof(unsafe.Pointer(nil))]byte
}

// ethtoolTxChecksum reads or, with set non-nil, writes the TX checksum
// offload of ifname in the calling thread's network namespace.
func ethtoolTxChecksum(ifname string, set *bool) (bool, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("open ethtool socket: %w", err)
	}
	defer unix.Close(fd)
	call := func(v *ethtoolValue) error {
		var ifr ifreqData
		copy(ifr.name[:unix.IFNAMSIZ-1], ifname)
		ifr.data = unsafe.Pointer(v)
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
		if errno != 0 {
			return errno
		}
		return nil
	}
	if set != nil {
		v := ethtoolValue{cmd: ethtoolSTXCSUM}
		if *set {
			v.data = 1
		}
		if err := call(&v); err != nil {
			return false, fmt.Errorf("set tx checksum offload of %s: %w", ifname, err)
		}
	}
	v := ethtoolValue{cmd: ethtoolGTXCSUM}
	if err := call(&v); err != nil {
		return false, fmt.Errorf("get tx checksum offload of %s: %w", ifname, err)
	}
	return v.data != 0, nil
}

package testnet

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Raw is an AF_PACKET socket on one interface of a namespace: it sends
// whole Ethernet frames as they are (a forged packet, a VLAN tag in the
// frame, a fragment) and keeps every frame the interface sends or receives
// from its creation on. Close (registered as cleanup) closes it.
type Raw struct {
	fd      int
	ifindex int

	mu      sync.Mutex
	frames  []Frame
	done    chan struct{} // closed by Close
	stopped chan struct{} // closed by the reader when it returns
}

// Frame is a frame a Raw socket saw.
type Frame struct {
	Data     []byte
	Outgoing bool // sent by the namespace, not received
	// VLAN is the 802.1Q tag the kernel holds outside the frame's bytes
	// (PACKET_AUXDATA), with VLANValid; a tag inside Data is not reported
	// here.
	VLAN      uint16
	VLANValid bool
	At        time.Time
}

// Raw opens a packet socket on iface in the namespace.
func (ns *NS) Raw(t TB, iface string) *Raw {
	t.Helper()
	r := &Raw{done: make(chan struct{}), stopped: make(chan struct{})}
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(iface)
		if err != nil {
			return fmt.Errorf("find %s: %w", iface, err)
		}
		r.ifindex = ifi.Index
		// The socket stays in the namespace it was created in.
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("open packet socket: %w", err)
		}
		r.fd = fd
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: r.ifindex}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind packet socket to %s: %w", iface, err)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_AUXDATA, 1); err != nil {
			unix.Close(fd)
			return fmt.Errorf("ask for packet auxdata: %w", err)
		}
		tv := unix.Timeval{Usec: 100000}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return fmt.Errorf("set receive timeout: %w", err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("raw socket in %s: %v", ns.Name, err)
	}
	go r.read()
	t.Cleanup(r.Close)
	return r
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// read keeps every frame until Close.
func (r *Raw) read() {
	defer close(r.stopped)
	buf := make([]byte, 65536)
	oob := make([]byte, 256)
	for {
		select {
		case <-r.done:
			return
		default:
		}
		n, oobn, _, from, err := unix.Recvmsg(r.fd, buf, oob, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		f := Frame{Data: slices.Clone(buf[:n]), At: time.Now()}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok {
			f.Outgoing = ll.Pkttype == unix.PACKET_OUTGOING
		}
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				if m.Header.Level != unix.SOL_PACKET || m.Header.Type != unix.PACKET_AUXDATA || len(m.Data) < 20 {
					continue
				}
				// struct tpacket_auxdata: status, len, snaplen (u32),
				// mac, net (u16), vlan_tci, vlan_tpid (u16).
				status := uint32(m.Data[0]) | uint32(m.Data[1])<<8 | uint32(m.Data[2])<<16 | uint32(m.Data[3])<<24
				f.VLAN = uint16(m.Data[16]) | uint16(m.Data[17])<<8
				f.VLANValid = status&unix.TP_STATUS_VLAN_VALID != 0
			}
		}
		r.mu.Lock()
		r.frames = append(r.frames, f)
		r.mu.Unlock()
	}
}

// Send sends one frame out of the interface as it is.
func (r *Raw) Send(frame []byte) error {
	to := &unix.SockaddrLinklayer{Ifindex: r.ifindex, Halen: 6}
	copy(to.Addr[:], frame[0:6])
	if err := unix.Sendto(r.fd, frame, 0, to); err != nil {
		return fmt.Errorf("send raw frame: %w", err)
	}
	return nil
}

// Frames returns the frames seen so far.
func (r *Raw) Frames() []Frame {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.frames)
}

// Await returns the frames seen that match, once there is at least one
// and no new one came for quiet (frames are read in the background, a
// little after they pass), or what there is after limit.
func (r *Raw) Await(match func(Frame) bool, quiet, limit time.Duration) []Frame {
	var got []Frame
	last, end := time.Now(), time.Now().Add(limit)
	for {
		var now []Frame
		for _, f := range r.Frames() {
			if match(f) {
				now = append(now, f)
			}
		}
		if len(now) != len(got) {
			got, last = now, time.Now()
		}
		if len(got) > 0 && time.Since(last) >= quiet || time.Now().After(end) {
			return got
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Close stops the reader and closes the socket.
func (r *Raw) Close() {
	select {
	case <-r.done:
		return
	default:
	}
	close(r.done)
	<-r.stopped // within the receive timeout
	unix.Close(r.fd)
}

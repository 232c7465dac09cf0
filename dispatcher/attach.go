package dispatcher

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// XDPMode is how a program is attached.
type XDPMode string

// The attach modes.
const (
	Native  XDPMode = "native"  // in the driver
	Generic XDPMode = "generic" // after the kernel built an skb
)

func (m XDPMode) flags() (link.XDPAttachFlags, error) {
	switch m {
	case Native, "":
		return link.XDPDriverMode, nil
	case Generic:
		return link.XDPGenericMode, nil
	}
	return 0, fmt.Errorf("xdp mode %q: not native or generic", string(m))
}

// Attachment is a program attached to an interface through a bpf_link.
type Attachment struct {
	link link.Link
	pin  string // where the link is pinned, or ""
}

// Attach attaches prog to the interface ifindex. Closing the attachment
// detaches it.
func Attach(prog *ebpf.Program, ifindex int, mode XDPMode) (*Attachment, error) {
	flags, err := mode.flags()
	if err != nil {
		return nil, err
	}
	l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifindex, Flags: flags})
	if err != nil {
		return nil, fmt.Errorf("attach xdp (%s) to ifindex %d: %w", mode, ifindex, err)
	}
	return &Attachment{link: l}, nil
}

// Replace atomically swaps the attached program: no packet sees the
// interface without a program.
func (a *Attachment) Replace(prog *ebpf.Program) error {
	if err := a.link.Update(prog); err != nil {
		return fmt.Errorf("replace xdp program: %w", err)
	}
	return nil
}

// Close detaches the program, removing the link's pin if it has one.
func (a *Attachment) Close() error {
	if a.pin != "" {
		if err := os.Remove(a.pin); err != nil && !errors.Is(err, os.ErrNotExist) {
			a.link.Close()
			return fmt.Errorf("detach xdp: remove pin: %w", err)
		}
	}
	if err := a.link.Close(); err != nil {
		return fmt.Errorf("detach xdp: %w", err)
	}
	return nil
}

// Release lets the attachment go without detaching: a pinned link keeps
// the program attached after the process exits. An unpinned one is
// detached, as by Close.
func (a *Attachment) Release() error {
	if a.pin == "" {
		return a.Close()
	}
	return a.link.Close()
}

// ProgramID is the id of the program the link runs.
func (a *Attachment) ProgramID() (ebpf.ProgramID, error) {
	info, err := a.link.Info()
	if err != nil {
		return 0, fmt.Errorf("read link: %w", err)
	}
	return info.Program, nil
}

// Package fsperm refuses files that a user other than root could have
// written, before xlbd runs them as root (policy plugins) or loads them
// into the kernel (chain members): whoever can write such a file gets
// root.
//
// It checks what sshd's StrictModes checks for its key files: with
// symbolic links resolved, the file and every directory on its path up to
// / must be owned by root and writable by no one else (no group or world
// write bit). The file must be a regular file.
//
// One exception, where xlb differs from sshd: a directory owned by root,
// world-writable and sticky (mode 1777, such as /tmp) is accepted. The
// sticky bit keeps other users from removing or renaming entries they do
// not own, so they can add names to it but cannot replace a root-owned
// file or directory in it. This lets root use files built in temporary
// directories (as the tests and `go build` in /tmp do); every directory
// below such a directory is still checked.
//
// Check returns the resolved path. Callers use it from then on: a
// symbolic link on the way may be changed afterwards by whoever owns its
// directory, the resolved path only by root.
package fsperm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// ErrUnsafe is wrapped by every refusal.
var ErrUnsafe = errors.New("unsafe: a user other than root could write it")

// Check resolves path and checks that only root can have written the
// file and each directory on its resolved path. It returns the resolved,
// absolute path.
func Check(path string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("check %s: %w", path, err)
	}
	file, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return "", fmt.Errorf("check %s: %w", path, err)
	}
	fi, err := os.Lstat(file)
	if err != nil {
		return "", fmt.Errorf("check %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("check %s: %s is not a regular file", path, file)
	}
	name := file
	if file != abs {
		name = fmt.Sprintf("%s (%s)", path, file)
	}
	if err := safe(fi, false); err != nil {
		return "", fmt.Errorf("%s: %w: it %w; make it root's and not writable by group or others (chown root; chmod go-w)", name, ErrUnsafe, err)
	}
	for dir := filepath.Dir(file); ; dir = filepath.Dir(dir) {
		fi, err := os.Stat(dir)
		if err != nil {
			return "", fmt.Errorf("check %s: %w", path, err)
		}
		if err := safe(fi, true); err != nil {
			return "", fmt.Errorf("%s: %w: directory %s %w; every directory on the path must be root's and not writable by group or others (or be root's and sticky, like /tmp)", name, ErrUnsafe, dir, err)
		}
		if dir == "/" {
			return file, nil
		}
	}
}

// safe checks one file or directory's owner and mode.
func safe(fi fs.FileInfo, isDir bool) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return errors.New("has no owner information")
	}
	mode := fi.Mode()
	switch {
	case st.Uid != 0:
		return fmt.Errorf("is owned by uid %d, not root", st.Uid)
	case isDir && mode&fs.ModeSticky != 0 && mode.Perm()&0o002 != 0:
		return nil // root's sticky directory: see the package comment
	case mode.Perm()&0o002 != 0:
		return fmt.Errorf("is writable by others (mode %04o)", modeBits(mode))
	case mode.Perm()&0o020 != 0:
		return fmt.Errorf("is writable by its group (mode %04o)", modeBits(mode))
	}
	return nil
}

// modeBits is the mode as chmod writes it, sticky bit included.
func modeBits(m fs.FileMode) uint32 {
	b := uint32(m.Perm())
	if m&fs.ModeSticky != 0 {
		b |= 0o1000
	}
	return b
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"time"

	"github.com/xlb-project/xlb/internal/control"
)

// explain turns a failure to reach xlbd into a message that names the
// socket and says what to do. Other errors (xlbd's answers) pass as they
// are.
func explain(err error, timeout time.Duration) error {
	var de *control.DialError
	if !errors.As(err, &de) {
		return err
	}
	switch {
	case errors.Is(de.Err, fs.ErrNotExist):
		return fmt.Errorf("no xlbd socket at %s: is xlbd running? Start it (systemctl start xlbd), or give xlbctl its socket with --socket or XLB_SOCKET", de.Socket)
	case errors.Is(de.Err, syscall.ECONNREFUSED) && !isSocket(de.Socket), errors.Is(de.Err, syscall.ENOTSOCK):
		return fmt.Errorf("%s is not a socket: give xlbctl xlbd's socket (its socket key) with --socket or XLB_SOCKET", de.Socket)
	case errors.Is(de.Err, syscall.ECONNREFUSED):
		return fmt.Errorf("nothing answers on %s: xlbd is not running there (it may have died and left its socket behind); start it (systemctl start xlbd) and see its log (journalctl -u xlbd)", de.Socket)
	case errors.Is(de.Err, fs.ErrPermission):
		return fmt.Errorf("permission denied on %s: xlbd's socket is for root only; run xlbctl as root (sudo xlbctl ...)", de.Socket)
	case errors.Is(de.Err, syscall.ENOTDIR):
		return fmt.Errorf("%s is not a socket (a part of its path is not a directory): give xlbctl xlbd's socket with --socket or XLB_SOCKET", de.Socket)
	case errors.Is(de.Err, context.DeadlineExceeded), os.IsTimeout(de.Err):
		return fmt.Errorf("xlbd at %s did not answer within %s: it may be busy or stuck; see its log (journalctl -u xlbd), or wait longer with --timeout", de.Socket, timeout)
	case errors.Is(de.Err, context.Canceled):
		return fmt.Errorf("interrupted while waiting for xlbd at %s", de.Socket)
	}
	return fmt.Errorf("reach xlbd at %s: %v", de.Socket, de.Err)
}

func isSocket(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().Type() == fs.ModeSocket
}

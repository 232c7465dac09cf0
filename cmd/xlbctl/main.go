// Command xlbctl talks to a running xlbd over its control socket:
//
//	xlbctl status
//	xlbctl conns [--vip VIP:PORT] [--backend IP:PORT] [--state STATE]
//	xlbctl stats [--rate [--interval 1s]]
//	xlbctl config
//	xlbctl reload
//	xlbctl backend add|remove|drain SERVICE ADDRESS
//	xlbctl backend set-weight SERVICE ADDRESS WEIGHT
//	xlbctl service add VIP:PORT --backend IP:PORT[@WEIGHT]... [--check tcp|http ...]
//	xlbctl service remove VIP:PORT
//	xlbctl policy set NAME [--service VIP:PORT]
//	xlbctl chain list
//	xlbctl chain add NAME --object FILE [--program P] [--priority N] [--continue-on pass,drop]
//	xlbctl chain remove NAME
//	xlbctl completion bash|zsh|fish
//
// It is a client of xlbd's gRPC control API (docs/api.md). Every command
// takes --socket (default XLB_SOCKET or /run/xlb/xlbd.sock), --timeout and
// --json. `xlbctl --help` lists them; `xlbctl --version`
// says what it was built from.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}

// exitCode prints err and returns the exit status: 0 on success, 2 for a
// command line xlbctl does not understand, 1 for anything else.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, "xlbctl:", err)
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", ue.cmd)
		return 2
	}
	return 1
}

// Command xlbctl talks to a running xlbd over its unix socket.
//
//	xlbctl [--socket PATH] status
//	xlbctl [--socket PATH] conns
//	xlbctl [--socket PATH] policy set NAME [--service VIP:PORT]
//	xlbctl [--socket PATH] chain list
//	xlbctl [--socket PATH] chain add NAME --object FILE [--program P] [--priority N] [--continue-on pass,drop]
//	xlbctl [--socket PATH] chain remove NAME
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/control"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "xlbctl:", err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage: xlbctl [--socket PATH] [--json] status | conns | policy set NAME [--service VIP:PORT] | chain list | chain add NAME --object FILE [--program P] [--priority N] [--continue-on V,...] | chain remove NAME")

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := pflag.NewFlagSet("xlbctl", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.SetInterspersed(true)
	socket := fs.String("socket", envOr("XLB_SOCKET", config.DefaultSocket), "xlbd's control socket")
	asJSON := fs.Bool("json", false, "print JSON")
	service := fs.String("service", "", "policy set: only this service (VIP:PORT)")
	object := fs.String("object", "", "chain add: ELF object file")
	program := fs.String("program", "", "chain add: program name in the object")
	priority := fs.Int("priority", -1, "chain add: priority (default: the object's XDP_RUN_CONFIG, or 50)")
	continueOn := fs.StringSlice("continue-on", nil, "chain add: verdicts after which the chain goes on (default pass)")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for xlbd")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	c := control.NewClient(*socket)
	a := fs.Args()
	switch {
	case len(a) == 1 && a[0] == "status":
		st, err := c.Status(ctx)
		if err != nil || *asJSON {
			return printJSON(stdout, st, err)
		}
		printStatus(stdout, st)
		return nil
	case len(a) == 1 && a[0] == "conns":
		cs, err := c.Conns(ctx)
		if err != nil || *asJSON {
			return printJSON(stdout, cs, err)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PROTO\tCLIENT\tVIP\tSOURCE\tBACKEND\tSTATE\tIDLE")
		for _, x := range cs {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", x.Protocol, x.Client, x.VIP, x.Source, x.Backend, x.State, time.Duration(x.IdleMS)*time.Millisecond)
		}
		return tw.Flush()
	case len(a) == 3 && a[0] == "policy" && a[1] == "set":
		name := a[2]
		if strings.ContainsRune(name, '/') && !filepath.IsAbs(name) {
			abs, err := filepath.Abs(name)
			if err != nil {
				return err
			}
			name = abs
		}
		r, err := c.SetPolicy(ctx, control.PolicyRequest{Policy: name, Service: *service})
		if err != nil || *asJSON {
			return printJSON(stdout, r, err)
		}
		fmt.Fprintf(stdout, "policy %s in force for %s (took %s)\n", a[2], strings.Join(r.Services, ", "), r.Took)
		return nil
	case len(a) == 2 && a[0] == "chain" && a[1] == "list":
		ms, err := c.ChainList(ctx)
		if err != nil || *asJSON {
			return printJSON(stdout, ms, err)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PRIORITY\tNAME\tPROGRAM\tCONTINUE-ON\tOBJECT\tMAPS")
		for _, m := range ms {
			obj := m.Object
			if m.Builtin {
				obj = "(xlb pipeline)"
			}
			maps := m.PinPath
			if len(m.Maps) > 0 {
				maps += "/{" + strings.Join(m.Maps, ",") + "}"
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", m.Priority, m.Name, m.Program, strings.Join(m.ContinueOn, ","), obj, maps)
		}
		return tw.Flush()
	case len(a) == 3 && a[0] == "chain" && a[1] == "add":
		if *object == "" {
			return fmt.Errorf("%w: chain add needs --object", errUsage)
		}
		obj, err := filepath.Abs(*object)
		if err != nil {
			return err
		}
		m := control.ChainMember{Name: a[2], Object: obj, Program: *program, Priority: *priority, ContinueOn: *continueOn}
		if err := c.ChainAdd(ctx, m); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "chain member %s added\n", a[2])
		return nil
	case len(a) == 3 && a[0] == "chain" && a[1] == "remove":
		if err := c.ChainRemove(ctx, a[2]); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "chain member %s removed\n", a[2])
		return nil
	}
	return errUsage
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func printJSON(w io.Writer, v any, err error) error {
	if err != nil {
		return err
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printStatus(w io.Writer, st control.Status) {
	fmt.Fprintf(w, "interface %s (%s), source addresses %s, ports %s\n", st.Iface, st.XDPMode, strings.Join(st.SourceAddresses, ","), st.SourcePorts)
	if r := st.LastReload; r != nil {
		at := r.At.Local().Format(time.DateTime)
		if r.OK {
			fmt.Fprintf(w, "last reload %s: applied (took %s)\n", at, r.Took)
		} else {
			fmt.Fprintf(w, "last reload %s: failed: %s\n", at, firstLine(r.Error))
		}
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, s := range st.Services {
		fmt.Fprintf(tw, "service %s/%s\tpolicy %s\n", s.VIP, s.Protocol, s.Policy)
		for _, b := range s.Backends {
			fmt.Fprintf(tw, "  backend %s\t%s\tweight %d\tactive %d\thalf-open %d\tnew/s %.1f\tports %d used %d resting of %d\trefused %d\tnext hop: %s\n",
				b.Address, b.State, b.Weight, b.Active, b.HalfOpen, b.NewPerSec, b.PortsUsed, b.PortsHeld, b.PortPool, b.NoPort, b.NextHop)
		}
	}
	tw.Flush()
	for _, p := range st.Policies {
		pid := "down"
		if p.Pid > 0 {
			pid = fmt.Sprintf("pid %d, api %d, asked %s", p.Pid, p.APIVersion, p.Asked)
		}
		fmt.Fprintf(tw, "policy plugin %s\t%s\trestarts %d\t%s\n", p.Name, pid, p.Restarts, p.Path)
	}
	tw.Flush()
	names := make([]string, 0, len(st.Counters))
	for n, v := range st.Counters {
		if v > 0 {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	fmt.Fprintln(w, "counters:")
	for _, n := range names {
		fmt.Fprintf(w, "  %-18s %d\n", n, st.Counters[n])
	}
}

// firstLine is s up to its first newline, marked when cut.
func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " ..."
	}
	return s
}

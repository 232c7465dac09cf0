package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/control"
	controlpb "github.com/xlb-project/xlb/internal/control/proto"
	"github.com/xlb-project/xlb/internal/version"
)

// usageError is a command line xlbctl does not understand (exit status 2);
// cmd is the command whose help to read, such as "xlbctl chain add".
type usageError struct {
	error
	cmd string
}

func (e usageError) Unwrap() error { return e.error }

// runError is an error of a command that ran (exit status 1).
type runError struct{ error }

func (e runError) Unwrap() error { return e.error }

// builtinPolicies are the policies xlb ships, offered by completion.
var builtinPolicies = []string{"random", "hash", "least-conn"}

// cli holds the global flags and the connection to xlbd.
type cli struct {
	socket  string
	timeout time.Duration
	json    bool
	stdout  io.Writer
}

// call runs f against xlbd's control API within the timeout, and turns a
// failure to reach xlbd into advice.
func (c *cli) call(ctx context.Context, f func(context.Context, controlpb.ControlClient) error) error {
	return c.callWithin(ctx, c.timeout, f)
}

// ask makes one call to xlbd and prints its answer: in the protobuf JSON
// mapping with --json, else as show prints it.
func ask[R proto.Message](ctx context.Context, c *cli, rpc func(context.Context, controlpb.ControlClient) (R, error), show func(R) error) error {
	var r R
	err := c.call(ctx, func(ctx context.Context, d controlpb.ControlClient) (err error) {
		r, err = rpc(ctx, d)
		return err
	})
	if err != nil {
		return err
	}
	if c.json {
		return printProtoJSON(c.stdout, r)
	}
	return show(r)
}

func (c *cli) callWithin(ctx context.Context, timeout time.Duration, f func(context.Context, controlpb.ControlClient) error) error {
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cl, err := control.Dial(c.socket)
	if err != nil {
		return err
	}
	defer cl.Close()
	return explain(f(ctx, cl), timeout)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	var re runError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &re):
		return re.error
	}
	return usageError{err, cmd.CommandPath()}
}

// oneArg accepts exactly one argument, described by what.
func oneArg(what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != 1 {
			return fmt.Errorf("%s takes one %s, not %d arguments", strings.TrimPrefix(cmd.CommandPath(), "xlbctl "), what, len(args))
		}
		return nil
	}
}

// runE marks the errors of a command's own work, as opposed to cobra's
// errors about the command line.
func runE(f func(cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		if err := f(cmd, args); err != nil {
			return runError{err}
		}
		return nil
	}
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	c := &cli{stdout: stdout}
	root := &cobra.Command{
		Use:   "xlbctl",
		Short: "Control a running xlbd",
		Long: `xlbctl talks to a running xlbd over its control socket (the gRPC API of
docs/api.md): status, tracked connections, counters, the configuration in
force, reloads, and live changes of backends, services, policies and the
XDP chain. Live changes are kept across reloads unless the configuration
file changes the same item.`,
		Version:           version.Read().String(),
		SilenceErrors:     true,
		SilenceUsage:      true,
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE:              showHelp,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetVersionTemplate("xlbctl {{.Version}}\n")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return err })
	pf := root.PersistentFlags()
	pf.StringVar(&c.socket, "socket", envOr("XLB_SOCKET", config.DefaultSocket), "xlbd's control socket (environment: XLB_SOCKET)")
	pf.DurationVar(&c.timeout, "timeout", 30*time.Second, "how long to wait for xlbd")
	pf.BoolVar(&c.json, "json", false, "print JSON")
	root.AddGroup(&cobra.Group{ID: "xlbd", Title: "Commands:"})
	for _, sub := range []*cobra.Command{c.statusCmd(), c.connsCmd(), c.statsCmd(), c.configCmd(), c.reloadCmd(), c.backendCmd(), c.serviceCmd(),
		c.policyCmd(), c.chainCmd(), c.shutdownCmd()} {
		sub.GroupID = "xlbd"
		root.AddCommand(sub)
	}
	return root
}

// showHelp is the action of a command that only groups others: it
// prints its help (an unknown subcommand is refused by its Args).
func showHelp(cmd *cobra.Command, _ []string) error { return cmd.Help() }

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func (c *cli) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "status",
		Short:             "Show the interface, services, backends, policy plugins and counters",
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: runE(func(cmd *cobra.Command, _ []string) error {
			return ask(cmd.Context(), c, func(ctx context.Context, d controlpb.ControlClient) (*controlpb.Status, error) {
				return d.GetStatus(ctx, &controlpb.GetStatusRequest{})
			}, func(st *controlpb.Status) error {
				printStatus(c.stdout, st)
				return nil
			})
		}),
	}
}

func (c *cli) connsCmd() *cobra.Command {
	f := &controlpb.ListConnsRequest{}
	cmd := &cobra.Command{
		Use:   "conns",
		Short: "List tracked connections",
		Long: `List the connections in xlb's connection table: client, VIP, the load
balancer's source address and port towards the backend, backend, state and
idle time, TCP and UDP alike. The filters combine: only connections matching all are listed.`,
		Example: `  xlbctl conns --vip 10.0.0.10:80 --state established
  xlbctl conns --backend 10.0.0.21:8080`,
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		PreRunE: func(*cobra.Command, []string) error {
			return control.ValidateConnFilter(f)
		},
		RunE: runE(func(cmd *cobra.Command, _ []string) error {
			return ask(cmd.Context(), c, func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ListConnsResponse, error) {
				return d.ListConns(ctx, f)
			}, func(cs *controlpb.ListConnsResponse) error {
				return printConns(c.stdout, cs.GetConns())
			})
		}),
	}
	cmd.Flags().StringVar(&f.Vip, "vip", "", "only connections to this `VIP:PORT`")
	cmd.Flags().StringVar(&f.Backend, "backend", "", "only connections to this backend `IP:PORT`")
	cmd.Flags().StringVar(&f.State, "state", "", "only connections in this `state`: "+strings.Join(control.ConnStates, ", "))
	cmd.Flags().StringVar(&f.Protocol, "protocol", "", "only connections of this `protocol`: "+strings.Join(control.ConnProtocols, ", "))
	_ = cmd.RegisterFlagCompletionFunc("vip", c.completeVIPs)
	_ = cmd.RegisterFlagCompletionFunc("backend", c.completeBackends)
	_ = cmd.RegisterFlagCompletionFunc("state", cobra.FixedCompletions(control.ConnStates, cobra.ShellCompDirectiveNoFileComp))
	_ = cmd.RegisterFlagCompletionFunc("protocol", cobra.FixedCompletions(control.ConnProtocols, cobra.ShellCompDirectiveNoFileComp))
	return cmd
}

func (c *cli) statsCmd() *cobra.Command {
	var rate bool
	var interval time.Duration
	cmd := &cobra.Command{
		Use:   "stats",
		Short: "Show counters per service and backend, or their rates",
		Long: `Show, in the manner of ipvsadm -Ln --stats, each service and its backends
with their open connections (ActiveConn) and the connections created since
the backend was configured (Conns), then the source-port table's use and
the data path's counters.

With --rate, two readings --interval apart give per-second rates instead,
in the manner of ipvsadm -Ln --rate: new connections per second (CPS) and
each counter per second. Open connections are shown as they are at the
second reading.`,
		Example: `  xlbctl stats
  xlbctl stats --rate --interval 5s`,
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		PreRunE: func(*cobra.Command, []string) error {
			if interval <= 0 {
				return fmt.Errorf("--interval %s: want a positive duration", interval)
			}
			return nil
		},
		RunE: runE(func(cmd *cobra.Command, _ []string) error {
			// read takes a reading and the time it was asked for.
			read := func() (st *controlpb.Stats, at time.Time, err error) {
				err = c.call(cmd.Context(), func(ctx context.Context, d controlpb.ControlClient) (err error) {
					at = time.Now()
					st, err = d.GetStats(ctx, &controlpb.GetStatsRequest{})
					return err
				})
				return st, at, err
			}
			first, t0, err := read()
			if err != nil {
				return err
			}
			if !rate {
				if c.json {
					return printProtoJSON(c.stdout, first)
				}
				return printStats(c.stdout, first)
			}
			select {
			case <-cmd.Context().Done():
				return cmd.Context().Err()
			case <-time.After(interval):
			}
			second, t1, err := read()
			if err != nil {
				return err
			}
			r := rates(first, second, t1.Sub(t0))
			if c.json {
				return printJSON(c.stdout, r)
			}
			return printRates(c.stdout, r)
		}),
	}
	cmd.Flags().BoolVar(&rate, "rate", false, "show rates per second between two readings")
	cmd.Flags().DurationVar(&interval, "interval", time.Second, "with --rate: time between the two readings")
	return cmd
}

func (c *cli) policyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:               "policy",
		Short:             "Change services' selection policy",
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE:              showHelp,
	}
	var service, protocol string
	set := &cobra.Command{
		Use:   "set NAME",
		Short: "Swap the policy of every service, or of one with --service",
		Long: `Start the policy's plugin, install its selection tables for the services
and stop plugins no longer in use. NAME is a policy name looked up in
xlbd's plugin directory (random, hash, least-conn, or a third party's) or
the path of a plugin binary. Established connections keep their backends.
The change is live: a reload keeps it unless the file changes the service's
policy.`,
		Example: `  xlbctl policy set hash
  xlbctl policy set least-conn --service 10.0.0.10:80
  xlbctl policy set /opt/xlb/xlb-policy-custom`,
		Args: oneArg("policy NAME or plugin path"),
		ValidArgsFunction: func(cmd *cobra.Command, args []string, _ string) ([]cobra.Completion, cobra.ShellCompDirective) {
			if len(args) > 0 {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			names := slices.Clone(builtinPolicies)
			if st, err := c.quickStatus(cmd.Context()); err == nil {
				for _, p := range st.GetPolicies() {
					if !slices.Contains(names, p.GetName()) {
						names = append(names, p.GetName())
					}
				}
			}
			// A path to a plugin binary is a file.
			return names, cobra.ShellCompDirectiveDefault
		},
		PreRunE: func(*cobra.Command, []string) error {
			if service == "" {
				return checkProtocol(protocol)
			}
			if _, err := netip.ParseAddrPort(service); err != nil {
				return fmt.Errorf("--service %q is not VIP:PORT", service)
			}
			return checkProtocol(protocol)
		},
		RunE: runE(func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if strings.ContainsRune(name, '/') && !filepath.IsAbs(name) {
				abs, err := filepath.Abs(name)
				if err != nil {
					return err
				}
				name = abs
			}
			return ask(cmd.Context(), c, func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ChangeResponse, error) {
				return d.SetPolicy(ctx, &controlpb.SetPolicyRequest{Policy: name, Service: &controlpb.ServiceRef{Vip: service, Protocol: protocol}})
			}, func(r *controlpb.ChangeResponse) error {
				fmt.Fprintf(c.stdout, "policy %s in force for %s (took %s)\n", args[0], strings.Join(r.GetServices(), ", "), roundTook(r.GetTook()))
				return nil
			})
		}),
	}
	set.Flags().StringVar(&service, "service", "", "only this service (`VIP:PORT`)")
	set.Flags().StringVar(&protocol, "protocol", "", "with --service: only the service of this `protocol` (tcp or udp)")
	_ = set.RegisterFlagCompletionFunc("service", c.completeVIPs)
	cmd.AddCommand(set)
	return cmd
}

func (c *cli) chainCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:               "chain",
		Short:             "List, add and remove XDP programs chained with xlb",
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE:              showHelp,
	}
	list := &cobra.Command{
		Use:               "list",
		Short:             "List the chain in the order it runs",
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: runE(func(cmd *cobra.Command, _ []string) error {
			return ask(cmd.Context(), c, func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ListChainResponse, error) {
				return d.ListChain(ctx, &controlpb.ListChainRequest{})
			}, func(ms *controlpb.ListChainResponse) error {
				return printChain(c.stdout, ms.GetMembers())
			})
		}),
	}
	var m struct {
		object, program string
		priority        int
		continueOn      []string
	}
	add := &cobra.Command{
		Use:   "add NAME --object FILE",
		Short: "Add an XDP program to the chain",
		Long: `Load an XDP program from an ELF object and run it in the chain at its
priority (lower runs first; xlb's own pipeline is the member "xlb").
docs/chain-protocol.md describes what a member must do. The change is live:
a reload keeps it unless the file changes a member of that name.`,
		Example:           `  xlbctl chain add ddos --object /usr/lib/xlb/filter.o --priority 10 --continue-on pass`,
		Args:              oneArg("member NAME"),
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: runE(func(cmd *cobra.Command, args []string) error {
			obj, err := filepath.Abs(m.object)
			if err != nil {
				return err
			}
			member := &controlpb.ChainMember{Name: args[0], Object: obj, Program: m.program, ContinueOn: m.continueOn,
				HasContinueOn: cmd.Flags().Changed("continue-on")}
			if m.priority >= 0 {
				member.Priority, member.HasPriority = int32(m.priority), true
			}
			return c.liveChange(cmd.Context(), func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ChangeResponse, error) {
				return d.AddChainMember(ctx, &controlpb.AddChainMemberRequest{Member: member})
			})
		}),
	}
	add.Flags().StringVar(&m.object, "object", "", "ELF object `file` (required)")
	add.Flags().StringVar(&m.program, "program", "", "XDP program `name` in the object (default: its only XDP program)")
	add.Flags().IntVar(&m.priority, "priority", -1, "priority 0 to 1000, lower runs first (default: the object's XDP_RUN_CONFIG, or 50)")
	add.Flags().StringSliceVar(&m.continueOn, "continue-on", nil, "`verdicts` after which the chain goes on: "+strings.Join(config.Verdicts, ", ")+" (default pass)")
	_ = add.MarkFlagRequired("object")
	_ = add.MarkFlagFilename("object", "o")
	_ = add.RegisterFlagCompletionFunc("continue-on", cobra.FixedCompletions(config.Verdicts, cobra.ShellCompDirectiveNoFileComp))
	remove := &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove a program from the chain",
		Args:  oneArg("member NAME"),
		ValidArgsFunction: func(cmd *cobra.Command, args []string, _ string) ([]cobra.Completion, cobra.ShellCompDirective) {
			if len(args) > 0 {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			var names []cobra.Completion
			_ = c.callWithin(cmd.Context(), 2*time.Second, func(ctx context.Context, d controlpb.ControlClient) error {
				ms, err := d.ListChain(ctx, &controlpb.ListChainRequest{})
				for _, m := range ms.GetMembers() {
					if !m.GetBuiltin() {
						names = append(names, m.GetName())
					}
				}
				return err
			})
			return names, cobra.ShellCompDirectiveNoFileComp
		},
		RunE: runE(func(cmd *cobra.Command, args []string) error {
			return c.liveChange(cmd.Context(), func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ChangeResponse, error) {
				return d.RemoveChainMember(ctx, &controlpb.RemoveChainMemberRequest{Name: args[0]})
			})
		}),
	}
	cmd.AddCommand(list, add, remove)
	return cmd
}

func (c *cli) shutdownCmd() *cobra.Command {
	var keep bool
	cmd := &cobra.Command{
		Use:   "shutdown [--keep-datapath]",
		Short: "Stop xlbd, removing everything it made or keeping its data path forwarding",
		Long: `shutdown stops xlbd and waits until it has. Without --keep-datapath it
removes everything, as SIGTERM does: the XDP program, the pinned maps, the
addresses it added, the forwarding sysctl, the VIP filter. With
--keep-datapath (or SIGUSR2) the data path keeps forwarding established
and new connections with the tables in force, pinned under pin-path for
the next xlbd to adopt; xlbd cleanup removes it.`,
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: runE(func(cmd *cobra.Command, _ []string) error {
			err := c.call(cmd.Context(), func(ctx context.Context, d controlpb.ControlClient) error {
				if _, err := d.Shutdown(ctx, &controlpb.ShutdownRequest{KeepDatapath: keep}); err != nil {
					return err
				}
				// Stopped once the socket no longer answers.
				for {
					if _, err := d.GetStatus(ctx, &controlpb.GetStatusRequest{}); err != nil {
						if ctx.Err() != nil {
							return fmt.Errorf("xlbd still answers after %v", c.timeout)
						}
						return nil
					}
					time.Sleep(50 * time.Millisecond)
				}
			})
			if err != nil {
				return err
			}
			if keep {
				fmt.Fprintln(c.stdout, "xlbd stopped; the data path keeps forwarding (start xlbd to take it up, or run xlbd cleanup to remove it)")
			} else {
				fmt.Fprintln(c.stdout, "xlbd stopped; its data path and host changes are removed")
			}
			return nil
		}),
	}
	cmd.Flags().BoolVar(&keep, "keep-datapath", false, "leave the data path forwarding, pinned for the next xlbd")
	return cmd
}

// quickStatus asks xlbd for its status within 2 s, for completions.
func (c *cli) quickStatus(ctx context.Context) (*controlpb.Status, error) {
	var st *controlpb.Status
	err := c.callWithin(ctx, 2*time.Second, func(ctx context.Context, d controlpb.ControlClient) (err error) {
		st, err = d.GetStatus(ctx, &controlpb.GetStatusRequest{})
		return err
	})
	return st, err
}

func (c *cli) completeVIPs(cmd *cobra.Command, _ []string, _ string) ([]cobra.Completion, cobra.ShellCompDirective) {
	st, err := c.quickStatus(cmd.Context())
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []cobra.Completion
	for _, s := range st.GetServices() {
		if !s.GetRemoved() && !slices.Contains(out, s.GetVip()) {
			out = append(out, s.GetVip())
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}

func (c *cli) completeBackends(cmd *cobra.Command, _ []string, _ string) ([]cobra.Completion, cobra.ShellCompDirective) {
	st, err := c.quickStatus(cmd.Context())
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []cobra.Completion
	for _, s := range st.GetServices() {
		for _, b := range s.GetBackends() {
			if !slices.Contains(out, b.GetAddress()) {
				out = append(out, b.GetAddress())
			}
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}

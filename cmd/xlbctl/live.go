package main

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	controlpb "github.com/xlb-project/xlb/internal/control/proto"
)

// Live changes, the configuration in force and reloads.

// liveChange sends a change and prints what it changed.
func (c *cli) liveChange(ctx context.Context, f func(context.Context, controlpb.ControlClient) (*controlpb.ChangeResponse, error)) error {
	return ask(ctx, c, f, func(r *controlpb.ChangeResponse) error {
		for _, line := range r.GetChanges() {
			fmt.Fprintln(c.stdout, line)
		}
		fmt.Fprintf(c.stdout, "in force (took %s)\n", roundTook(r.GetTook()))
		return nil
	})
}

func roundTook(d *durationpb.Duration) string {
	return d.AsDuration().Round(100 * time.Microsecond).String()
}

func checkProtocol(p string) error {
	if p != "" && p != "tcp" && p != "udp" {
		return fmt.Errorf("--protocol %q is not tcp or udp", p)
	}
	return nil
}

// serviceArgs checks the arguments SERVICE ADDRESS [WEIGHT] of a backend
// command.
func serviceArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return fmt.Errorf("%s takes %s, not %d arguments", strings.TrimPrefix(cmd.CommandPath(), "xlbctl "), what, len(args))
		}
		if _, err := netip.ParseAddrPort(args[0]); err != nil {
			return fmt.Errorf("service %q is not VIP:PORT", args[0])
		}
		if n > 1 {
			if _, err := netip.ParseAddrPort(args[1]); err != nil {
				return fmt.Errorf("backend %q is not IP:PORT", args[1])
			}
		}
		if n > 2 {
			if w, err := strconv.ParseUint(args[2], 10, 32); err != nil || w > 65535 {
				return fmt.Errorf("weight %q is not a whole number from 0 to 65535", args[2])
			}
		}
		return nil
	}
}

func (c *cli) backendCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "backend",
		Short: "Add, remove, re-weight or drain a backend, live",
		Long: `Change a service's backends while traffic flows. Each change is applied as a
reload is (all or nothing; established connections keep their backends), and
kept across reloads unless the configuration file changes the same backend.
` + "`xlbctl status`" + ` marks backends changed live; ` + "`xlbctl config`" + ` prints the
configuration in force.`,
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE:              showHelp,
	}
	var protocol string
	var weight uint32
	ref := func(vip string) *controlpb.ServiceRef { return &controlpb.ServiceRef{Vip: vip, Protocol: protocol} }
	add := &cobra.Command{
		Use:     "add SERVICE ADDRESS",
		Short:   "Add a backend to a service",
		Example: `  xlbctl backend add 10.0.0.10:80 10.0.0.23:8080 --weight 2`,
		Args:    serviceArgs(2, "a service VIP:PORT and a backend IP:PORT"),
		RunE: runE(func(cmd *cobra.Command, args []string) error {
			return c.liveChange(cmd.Context(), func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ChangeResponse, error) {
				return d.AddBackend(ctx, &controlpb.AddBackendRequest{Service: ref(args[0]), Address: args[1], Weight: weight})
			})
		}),
	}
	add.Flags().Uint32Var(&weight, "weight", 1, "the backend's `weight`, 1 to 65535")
	remove := &cobra.Command{
		Use:   "remove SERVICE ADDRESS",
		Short: "Remove a backend from a service",
		Long: `Remove a backend: it takes no new connections at once, its established
connections keep flowing, and ` + "`xlbctl status`" + ` shows it as removed with its
open connections until none is left.`,
		Args: serviceArgs(2, "a service VIP:PORT and a backend IP:PORT"),
		RunE: runE(func(cmd *cobra.Command, args []string) error {
			return c.liveChange(cmd.Context(), func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ChangeResponse, error) {
				return d.RemoveBackend(ctx, &controlpb.RemoveBackendRequest{Service: ref(args[0]), Address: args[1]})
			})
		}),
	}
	setWeight := &cobra.Command{
		Use:     "set-weight SERVICE ADDRESS WEIGHT",
		Short:   "Change a backend's weight (0 drains it)",
		Example: `  xlbctl backend set-weight 10.0.0.10:80 10.0.0.23:8080 5`,
		Args:    serviceArgs(3, "a service VIP:PORT, a backend IP:PORT and a weight"),
		RunE: runE(func(cmd *cobra.Command, args []string) error {
			w, _ := strconv.ParseUint(args[2], 10, 32)
			return c.liveChange(cmd.Context(), func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ChangeResponse, error) {
				return d.SetBackendWeight(ctx, &controlpb.SetBackendWeightRequest{Service: ref(args[0]), Address: args[1], Weight: uint32(w)})
			})
		}),
	}
	drain := &cobra.Command{
		Use:   "drain SERVICE ADDRESS",
		Short: "Drain a backend: no new connections, established ones finish",
		Long: `Drain a backend: its weight becomes 0, so it takes no new connections while
its established ones keep flowing. ` + "`xlbctl status`" + ` shows it draining with its
open connections, then drained once none is left; ` + "`xlbctl backend set-weight`" + `
brings it back.`,
		Args: serviceArgs(2, "a service VIP:PORT and a backend IP:PORT"),
		RunE: runE(func(cmd *cobra.Command, args []string) error {
			return c.liveChange(cmd.Context(), func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ChangeResponse, error) {
				return d.DrainBackend(ctx, &controlpb.DrainBackendRequest{Service: ref(args[0]), Address: args[1]})
			})
		}),
	}
	for _, sub := range []*cobra.Command{add, remove, setWeight, drain} {
		sub.Flags().StringVar(&protocol, "protocol", "", "the service's `protocol`, when a tcp and a udp service share the VIP")
		sub.PreRunE = func(*cobra.Command, []string) error { return checkProtocol(protocol) }
		sub.ValidArgsFunction = c.completeServiceBackend
		_ = sub.RegisterFlagCompletionFunc("protocol", cobra.FixedCompletions([]string{"tcp", "udp"}, cobra.ShellCompDirectiveNoFileComp))
	}
	cmd.AddCommand(add, remove, setWeight, drain)
	return cmd
}

// completeServiceBackend completes a service, then one of its backends.
func (c *cli) completeServiceBackend(cmd *cobra.Command, args []string, _ string) ([]cobra.Completion, cobra.ShellCompDirective) {
	if len(args) == 0 {
		return c.completeVIPs(cmd, args, "")
	}
	if len(args) > 1 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	st, err := c.quickStatus(cmd.Context())
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []cobra.Completion
	for _, s := range st.GetServices() {
		if s.GetVip() != args[0] {
			continue
		}
		for _, b := range s.GetBackends() {
			if b.GetState() != "removed" && !slices.Contains(out, b.GetAddress()) {
				out = append(out, b.GetAddress())
			}
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}

func (c *cli) serviceCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "service",
		Short: "Add or remove a service, live",
		Long: `Add or remove a service while traffic flows, as a reload would. The change is
kept across reloads unless the configuration file changes the same service.`,
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE:              showHelp,
	}
	spec := &controlpb.ServiceSpec{}
	var backends, sources []string
	h := struct {
		check, path, host  string
		interval, timeout  time.Duration
		rise, fall, expect uint32
		reset              bool
	}{}
	add := &cobra.Command{
		Use:   "add VIP:PORT --backend IP:PORT[@WEIGHT]...",
		Short: "Add a service",
		Example: `  xlbctl service add 10.0.0.10:443 --backend 10.0.0.21:8443 --backend 10.0.0.22:8443@2 --policy hash
  xlbctl service add 10.0.0.10:80 --backend 10.0.0.21:8080 --check http --http-path /healthz --check-interval 1s`,
		Args:              serviceArgs(1, "a service VIP:PORT"),
		ValidArgsFunction: cobra.NoFileCompletions,
		PreRunE: func(cmd *cobra.Command, args []string) error {
			if err := checkProtocol(spec.Protocol); err != nil {
				return err
			}
			spec.Vip = args[0]
			spec.Backends = nil
			for _, b := range backends {
				addr, w, hasWeight := strings.Cut(b, "@")
				if _, err := netip.ParseAddrPort(addr); err != nil {
					return fmt.Errorf("--backend %q is not IP:PORT[@WEIGHT]", b)
				}
				bs := &controlpb.BackendSpec{Address: addr, Weight: 1}
				if hasWeight {
					n, err := strconv.ParseUint(w, 10, 32)
					if err != nil || n > 65535 {
						return fmt.Errorf("--backend %q: weight %q is not a whole number from 0 to 65535", b, w)
					}
					bs.Weight, bs.HasWeight = uint32(n), true
				}
				spec.Backends = append(spec.Backends, bs)
			}
			spec.SourceAddresses = sources
			healthSet := false
			for _, f := range []string{"check", "check-interval", "check-timeout", "rise", "fall", "http-path", "http-host", "expect-status", "reset-established"} {
				healthSet = healthSet || cmd.Flags().Changed(f)
			}
			spec.Health = nil
			if healthSet {
				spec.Health = &controlpb.HealthCheck{Check: h.check, Rise: h.rise, Fall: h.fall, HttpPath: h.path, HttpHost: h.host,
					HttpExpectStatus: h.expect, ResetEstablished: h.reset}
				if h.interval > 0 {
					spec.Health.Interval = durationpb.New(h.interval)
				}
				if h.timeout > 0 {
					spec.Health.Timeout = durationpb.New(h.timeout)
				}
			}
			return nil
		},
		RunE: runE(func(cmd *cobra.Command, args []string) error {
			return c.liveChange(cmd.Context(), func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ChangeResponse, error) {
				return d.AddService(ctx, &controlpb.AddServiceRequest{Service: spec})
			})
		}),
	}
	f := add.Flags()
	f.StringArrayVar(&backends, "backend", nil, "backend `IP:PORT[@WEIGHT]` (repeatable, at least one)")
	f.StringVar(&spec.Protocol, "protocol", "", "`protocol`: tcp (default) or udp")
	f.StringVar(&spec.Policy, "policy", "", "the service's `policy` (default: xlbd's default policy)")
	f.StringVar(&spec.AllDown, "all-down", "", "when every backend is down: rst (default) or use-all")
	f.StringArrayVar(&sources, "source-address", nil, "the service's own source `address` (repeatable), among those xlbd started with")
	f.StringVar(&h.check, "check", "", "health `check`: tcp (default with any health flag), http or none")
	f.DurationVar(&h.interval, "check-interval", 0, "time between two health checks (default 2s)")
	f.DurationVar(&h.timeout, "check-timeout", 0, "timeout of one health check (default 1s, or the interval when shorter)")
	f.Uint32Var(&h.rise, "rise", 0, "passed checks in a row that bring a backend back (default 2)")
	f.Uint32Var(&h.fall, "fall", 0, "failed checks in a row that take a backend down (default 3)")
	f.StringVar(&h.path, "http-path", "", "http check: the request's `path` (default /)")
	f.StringVar(&h.host, "http-host", "", "http check: the Host `header` (default the backend's IP:PORT)")
	f.Uint32Var(&h.expect, "expect-status", 0, "http check: the status `code` that passes (default 200)")
	f.BoolVar(&h.reset, "reset-established", false, "reset a backend's established connections when its check takes it down")
	_ = add.MarkFlagRequired("backend")
	_ = add.RegisterFlagCompletionFunc("check", cobra.FixedCompletions([]string{"tcp", "http", "none"}, cobra.ShellCompDirectiveNoFileComp))
	_ = add.RegisterFlagCompletionFunc("all-down", cobra.FixedCompletions([]string{"rst", "use-all"}, cobra.ShellCompDirectiveNoFileComp))

	var protocol string
	remove := &cobra.Command{
		Use:   "remove VIP:PORT",
		Short: "Remove a service",
		Long: `Remove a service: new connections to its VIP are refused at once, its
established connections keep flowing, and ` + "`xlbctl status`" + ` lists its backends
as removed until their connections have ended.`,
		Args:              serviceArgs(1, "a service VIP:PORT"),
		ValidArgsFunction: c.completeVIPs,
		PreRunE:           func(*cobra.Command, []string) error { return checkProtocol(protocol) },
		RunE: runE(func(cmd *cobra.Command, args []string) error {
			return c.liveChange(cmd.Context(), func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ChangeResponse, error) {
				return d.RemoveService(ctx, &controlpb.RemoveServiceRequest{Service: &controlpb.ServiceRef{Vip: args[0], Protocol: protocol}})
			})
		}),
	}
	remove.Flags().StringVar(&protocol, "protocol", "", "the service's `protocol`, when a tcp and a udp service share the VIP")
	cmd.AddCommand(add, remove)
	return cmd
}

func (c *cli) configCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "config",
		Short: "Print the configuration in force as YAML",
		Long: `Print the configuration in force (the file's, with flags, environment and the
live changes applied) as a configuration file: saved as xlbd's file, it
gives the same services, backends, policies, health checks and chain.`,
		Example:           `  xlbctl config > /etc/xlb/xlb.yaml.new`,
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: runE(func(cmd *cobra.Command, _ []string) error {
			return ask(cmd.Context(), c, func(ctx context.Context, d controlpb.ControlClient) (*controlpb.GetConfigResponse, error) {
				return d.GetConfig(ctx, &controlpb.GetConfigRequest{})
			}, func(r *controlpb.GetConfigResponse) error {
				_, err := fmt.Fprint(c.stdout, r.GetYaml())
				return err
			})
		}),
	}
}

func (c *cli) reloadCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "reload",
		Short: "Reload the configuration file and report the outcome",
		Long: `Ask xlbd to re-read its configuration, as SIGHUP does, and wait for the
outcome: what is in force, or why the reload was refused (then nothing
changed). Live changes are kept unless the file changes the same item; those
the file overrides are listed.`,
		Args:              cobra.NoArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: runE(func(cmd *cobra.Command, _ []string) error {
			return ask(cmd.Context(), c, func(ctx context.Context, d controlpb.ControlClient) (*controlpb.ReloadResponse, error) {
				return d.Reload(ctx, &controlpb.ReloadRequest{})
			}, func(r *controlpb.ReloadResponse) error {
				fmt.Fprintf(c.stdout, "reloaded: %d services in force (took %s)\n", r.GetServices(), roundTook(r.GetTook()))
				for _, ch := range r.GetChainChanges() {
					fmt.Fprintf(c.stdout, "chain: %s\n", ch)
				}
				for _, d := range r.GetDroppedLiveChanges() {
					fmt.Fprintf(c.stdout, "live change dropped, the file changes the same item: %s\n", d)
				}
				return nil
			})
		}),
	}
}

// Command xlb-demo runs xlb's main job on an embedded default: it builds
// the original demo's network (two clients, a load balancer and two
// backends on one bridge) in network namespaces, starts xlbd on the load
// balancer with the embedded configuration, sends HTTP requests from both
// clients to the VIP, shows which backend answered each, and removes
// everything it created. Run it as root, after `make build`.
package main

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"text/template"

	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

//go:embed demo.yaml
var demoConfig string

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "xlb-demo:", err)
		os.Exit(1)
	}
}

// stack is a cleanup stack that satisfies testnet.TB, so the demo builds
// its network with the same helpers as the tests.
type stack struct {
	cleanups []func()
	failed   error
}

type abort struct{ err error }

func (s *stack) Helper()          {}
func (s *stack) Cleanup(f func()) { s.cleanups = append(s.cleanups, f) }
func (s *stack) Errorf(f string, a ...any) {
	if s.failed == nil {
		s.failed = fmt.Errorf(f, a...)
	}
}
func (s *stack) Fatal(a ...any)            { panic(abort{errors.New(fmt.Sprint(a...))}) }
func (s *stack) Fatalf(f string, a ...any) { panic(abort{fmt.Errorf(f, a...)}) }
func (s *stack) Logf(f string, a ...any)   { fmt.Printf(f+"\n", a...) }
func (s *stack) Failed() bool              { return s.failed != nil }

func (s *stack) unwind() {
	for i := len(s.cleanups) - 1; i >= 0; i-- {
		s.cleanups[i]()
	}
	s.cleanups = nil
}

func run(ctx context.Context, args []string, out io.Writer) (err error) {
	fs := flag.NewFlagSet("xlb-demo", flag.ContinueOnError)
	requests := fs.Int("requests", 10, "requests from each client")
	mode := fs.String("xdp-mode", "native", "native or generic")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("run as root: the demo creates network namespaces and loads XDP programs")
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	binDir := filepath.Dir(exe)
	if _, err := os.Stat(filepath.Join(binDir, "xlbd")); err != nil {
		return fmt.Errorf("find xlbd next to %s: run make build first: %w", exe, err)
	}
	xlbtest.UseBinaries(binDir)

	s := &stack{}
	defer func() {
		if r := recover(); r != nil {
			a, ok := r.(abort)
			if !ok {
				s.unwind()
				panic(r)
			}
			err = a.err
		}
		fmt.Fprintln(out, "\n== cleaning up: namespaces, links and xlbd")
		s.unwind()
		if err == nil {
			err = s.failed
		}
	}()

	fmt.Fprintln(out, "== building the network: client1, client2, lb, backend-a, backend-b on one bridge")
	lan := testnet.NewLAN(s, testnet.LANOptions{
		Hosts:         []string{"client1", "client2", "lb", "backend-a", "backend-b"},
		NativePeerXDP: *mode == "native",
	})
	lb, a, b := lan.Host("lb"), lan.Host("backend-a"), lan.Host("backend-b")
	for _, h := range lan.Hosts {
		fmt.Fprintf(out, "   %-9s %s  (netns %s)\n", h.Name, h.IP, h.NS.Name)
	}
	a.NS.ServeHTTP(s, a.IP.String()+":8080", "backend-a")
	b.NS.ServeHTTP(s, b.IP.String()+":8080", "backend-b")

	var cfg bytes.Buffer
	tmpl := template.Must(template.New("demo").Parse(demoConfig))
	if err := tmpl.Execute(&cfg, map[string]string{"LB": lb.IP.String(), "A": a.IP.String(), "B": b.IP.String()}); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "xlb-demo-")
	if err != nil {
		return err
	}
	s.Cleanup(func() { os.RemoveAll(dir) })
	cfgPath := filepath.Join(dir, "xlb.yaml")
	if err := os.WriteFile(cfgPath, cfg.Bytes(), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(out, "\n== starting xlbd on lb with this configuration (%s):\n%s\n", cfgPath, cfg.String())
	d := xlbtest.Start(s, lb.NS, "--config", cfgPath, "--xdp-mode", *mode)

	vip := "http://" + lb.IP.String() + ":80/"
	fmt.Fprintf(out, "== %d requests from each client to the VIP %s\n", *requests, vip)
	counts := map[string]int{}
	for _, name := range []string{"client1", "client2"} {
		c := lan.Host(name).NS.HTTPClient(false)
		for i := 0; i < *requests; i++ {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			who, err := testnet.Get(ctx, c, vip)
			if err != nil {
				return fmt.Errorf("%s request %d: %w", name, i+1, err)
			}
			counts[who]++
			fmt.Fprintf(out, "   %s -> %s  answered by %s\n", name, vip, who)
		}
	}
	fmt.Fprintf(out, "\n== replies by backend: backend-a %d, backend-b %d\n", counts["backend-a"], counts["backend-b"])

	fmt.Fprintln(out, "\n== xlbctl status")
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "xlbctl"), "--socket", d.Socket, "status")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("xlbctl status: %w", err)
	}
	if counts["backend-a"] == 0 || counts["backend-b"] == 0 {
		return fmt.Errorf("replies came from one backend only: %v", counts)
	}
	return nil
}

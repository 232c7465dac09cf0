// Command xlbd is the xlb daemon: it loads the XDP pipeline, attaches it
// to an interface and keeps the data path's state in line with its
// configuration. See docs/configuration.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/sdnotify"
	"github.com/xlb-project/xlb/internal/version"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "xlbd:", err)
		var ce configError
		if errors.As(err, &ce) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// configError marks errors in the configuration: nothing was touched.
type configError struct{ error }

func (e configError) Unwrap() error { return e.error }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "cleanup" {
		return runCleanup(ctx, args[1:], stdout, stderr)
	}
	cfg, err := config.Parse(args)
	if errors.Is(err, config.ErrVersion) {
		fmt.Fprintln(stdout, "xlbd", version.Read())
		return nil
	}
	if errors.Is(err, pflag.ErrHelp) {
		fmt.Fprintln(stdout, "Usage: xlbd [flags]")
		fs := config.NewFlagSet()
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		return nil
	}
	if err != nil {
		return configError{err}
	}
	log := newLogger(stderr, cfg.LogLevel, cfg.LogFormat)
	// Before anything starts: a SIGHUP during the start is a reload once
	// ready, a SIGUSR2 a stop keeping the data path, and the plugins do
	// not inherit systemd's socket.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	keep := make(chan os.Signal, 1)
	signal.Notify(keep, syscall.SIGUSR2)
	defer signal.Stop(keep)
	notify := sdnotify.FromEnv()
	d, err := newDaemon(ctx, cfg, args, log)
	if err != nil {
		return err
	}
	d.notify = notify
	keepDatapath, err := d.Run(ctx, hup, keep)
	if keepDatapath {
		if cerr := d.Release(); cerr != nil {
			log.Error("shut down", "err", cerr)
		}
		log.Info("stopped; the data path keeps running, pinned under pin-path for the next xlbd (xlbd cleanup removes it)", "pin_path", cfg.PinPath)
		return err
	}
	if cerr := d.Close(); cerr != nil {
		log.Error("shut down", "err", cerr)
	}
	log.Info("stopped")
	return err
}

// newLogger logs at level in format "text" (key=value) or "json".
func newLogger(w io.Writer, level, format string) *slog.Logger {
	opts := &slog.HandlerOptions{Level: logLevel(level)}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func logLevel(s string) slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return slog.LevelInfo
	}
	return l
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/spf13/pflag"

	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/state"
)

// runCleanup is `xlbd cleanup`: remove everything an xlbd left, after a
// crash or a shutdown that kept the data path. The pin path comes from
// --pin-path, XLB_PIN_PATH, the pin-path of a --config file, or the
// default.
func runCleanup(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := pflag.NewFlagSet("xlbd cleanup", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	pinPath := fs.String("pin-path", "", "bpffs `dir`ectory the xlbd pinned its state in (default: the config file's pin-path, XLB_PIN_PATH, or "+config.DefaultPinPath+")")
	file := fs.String("config", "", "the xlbd's configuration `file`, for its pin-path")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil
		}
		return configError{fmt.Errorf("parse flags: %w", err)}
	}
	if fs.NArg() > 0 {
		return configError{fmt.Errorf("parse flags: unexpected argument %q", fs.Arg(0))}
	}
	path, err := cleanupPath(*pinPath, *file)
	if err != nil {
		return configError{err}
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	done, err := state.Cleanup(ctx, path, log)
	for _, l := range done {
		fmt.Fprintln(stdout, l)
	}
	if err != nil {
		return err
	}
	if len(done) == 0 {
		fmt.Fprintf(stdout, "nothing of xlb under %s\n", path)
	}
	return nil
}

// cleanupPath picks the pin path: the flag, the environment, the file's
// pin-path, the default.
func cleanupPath(flag, file string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	if env := os.Getenv(config.EnvName("pin-path")); env != "" {
		return env, nil
	}
	if file != "" {
		p, err := config.PinPathOf(file)
		if err != nil {
			return "", err
		}
		if p != "" {
			return p, nil
		}
	}
	return config.DefaultPinPath, nil
}

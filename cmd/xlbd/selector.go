package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/policy"
)

// pluginDir is where policy names are looked up: the configured
// directory; else, for an installed xlbd (make install puts it in
// PREFIX/bin), PREFIX/lib/xlb/plugins when that directory exists; else
// the directory holding the xlbd binary (a build in bin/).
func pluginDir(cfg *config.Config) (string, error) {
	if cfg.PluginDir != "" {
		return cfg.PluginDir, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("find plugin directory: %w", err)
	}
	dir := filepath.Dir(exe)
	installed := filepath.Join(dir, "..", "lib", "xlb", "plugins")
	if fi, err := os.Stat(installed); err == nil && fi.IsDir() {
		return filepath.Clean(installed), nil
	}
	return dir, nil
}

func newPolicies(cfg *config.Config, d *daemon) (*policy.Manager, error) {
	dir, err := pluginDir(cfg)
	if err != nil {
		return nil, err
	}
	m := policy.NewManager(policy.Options{Dir: dir, SHA256: cfg.PluginSHA256, Logger: d.log})
	if err := checkPolicies(m, cfg.Services); err != nil {
		return nil, err
	}
	return m, nil
}

// checkPolicies refuses services whose policy plugin cannot be found or
// fails its pin, before anything is touched.
func checkPolicies(m *policy.Manager, svcs []config.Service) error {
	for i, svc := range svcs {
		if err := m.Check(svc.Policy); err != nil {
			return fmt.Errorf("services[%d].policy: %w", i, err)
		}
	}
	return nil
}

// startPolicies starts the plugin of every policy in use, before anything
// is loaded or attached: a binary that is not a policy plugin (such as
// /bin/true, which fails the handshake) is a configuration error naming
// its service's policy. The plugins stay running for the balancer.
func startPolicies(ctx context.Context, m *policy.Manager, svcs []config.Service) error {
	started := map[string]bool{}
	for i, svc := range svcs {
		if started[svc.Policy] {
			continue
		}
		if err := m.Start(ctx, svc.Policy); err != nil {
			return fmt.Errorf("services[%d].policy: plugin %s did not start: %w", i, svc.Policy, err)
		}
		started[svc.Policy] = true
	}
	return nil
}

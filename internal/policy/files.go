package policy

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"maps"
	"path/filepath"
	"slices"

	"github.com/xlb-project/xlb/internal/fsperm"
	"github.com/xlb-project/xlb/plugins"
)

// resolve maps a policy name or path to its plugin binary, refuses a
// binary that a user other than root could have written (the file or a
// directory on its path; internal/fsperm), and returns the binary's
// resolved path, which is what xlbd runs.
func (m *Manager) resolve(name string) (string, error) {
	path, err := plugins.Resolve(name, m.opts.Dir)
	if err != nil {
		return "", err
	}
	file, err := fsperm.Check(path)
	if err != nil && !filepath.IsAbs(name) {
		return "", fmt.Errorf("policy %s: %w", name, err) // the error names the path
	}
	return file, err
}

// checkFile checks a resolved plugin binary's permissions again (before
// every start) and returns its pinned SHA-256, or nil.
func (m *Manager) checkFile(file string) ([]byte, error) {
	if _, err := fsperm.Check(file); err != nil {
		return nil, err
	}
	return m.pin(file)
}

// pin returns the SHA-256 that plugin-sha256 pins the binary file to,
// or nil. A pin applies to the file its key names, a policy name or a
// path, resolved: naming the same binary another way does not escape
// it. Two keys that pin the same file to different sums are an error.
func (m *Manager) pin(file string) ([]byte, error) {
	var found []byte
	var foundKey string
	for _, key := range slices.Sorted(maps.Keys(m.opts.SHA256)) {
		path, err := plugins.Resolve(key, m.opts.Dir)
		if err != nil {
			continue // names no binary: it pins nothing here
		}
		if kfile, err := filepath.EvalSymlinks(path); err != nil || kfile != file {
			continue
		}
		sum, err := hex.DecodeString(m.opts.SHA256[key])
		if err != nil {
			return nil, fmt.Errorf("plugin-sha256[%q]: %w", key, err)
		}
		if found != nil && !bytes.Equal(found, sum) {
			return nil, fmt.Errorf("plugin-sha256: %q and %q pin the same binary %s to different sums", foundKey, key, file)
		}
		found, foundKey = sum, key
	}
	return found, nil
}

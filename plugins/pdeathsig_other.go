//go:build !linux

package plugins

import "os/exec"

// setParentDeathSignal does nothing outside Linux, which has no
// parent-death signal: there a plugin outlives a host that is killed.
func setParentDeathSignal(*exec.Cmd) {}

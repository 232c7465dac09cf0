// Package version says what a binary was built from. It reads the build
// information the Go toolchain embeds in every binary
// (runtime/debug.ReadBuildInfo): the module's version, and the VCS
// revision and commit time when the binary was built from a git checkout
// with VCS stamping on (`go build -buildvcs=auto`, as `make build` does).
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Info is what a binary was built from. Empty fields are unknown.
type Info struct {
	Module    string // module path
	Version   string // module version: for a build from a clean git checkout, a pseudo-version made from its revision; "(devel)" otherwise
	Revision  string // VCS revision (commit hash)
	Time      string // the revision's commit time, RFC 3339
	Modified  bool   // the checkout had uncommitted changes
	GoVersion string // the Go toolchain that built it
}

// Read returns the running binary's build information.
func Read() Info {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return Info{GoVersion: runtime.Version()}
	}
	return fromBuildInfo(bi)
}

func fromBuildInfo(bi *debug.BuildInfo) Info {
	i := Info{Module: bi.Main.Path, Version: bi.Main.Version, GoVersion: bi.GoVersion}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			i.Revision = s.Value
		case "vcs.time":
			i.Time = s.Value
		case "vcs.modified":
			i.Modified = s.Value == "true"
		}
	}
	return i
}

// String is the line `--version` prints after the program's name, such as
// "v0.0.0-20261204162013-64c7bb26947f github.com/xlb-project/xlb, revision
// 64c7bb2..., committed 2026-12-04T16:20:13Z, go1.26.8 linux/amd64".
func (i Info) String() string {
	v := i.Version
	if v == "" {
		v = "unknown version"
	}
	s := v
	if i.Module != "" {
		s += " " + i.Module
	}
	if i.Revision == "" {
		s += ", revision unknown (built without VCS information)"
	} else {
		s += ", revision " + i.Revision
		if i.Modified {
			s += " (modified)"
		}
		if i.Time != "" {
			s += ", committed " + i.Time
		}
	}
	return fmt.Sprintf("%s, %s %s/%s", s, i.GoVersion, runtime.GOOS, runtime.GOARCH)
}

package version

import (
	"runtime/debug"
	"strings"
	"testing"
)

func TestString(t *testing.T) {
	tests := []struct {
		name string
		bi   debug.BuildInfo
		want []string
		not  []string
	}{
		{
			name: "checkout with vcs stamping",
			bi: debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/xlb-project/xlb", Version: "(devel)"},
				Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "64c7bb26947f88ef9d2a00d9f918ada4f9ada99f"},
					{Key: "vcs.time", Value: "2026-12-04T16:20:13Z"}, {Key: "vcs.modified", Value: "true"}}},
			want: []string{"(devel) github.com/xlb-project/xlb", "revision 64c7bb26947f88ef9d2a00d9f918ada4f9ada99f (modified)", "committed 2026-12-04T16:20:13Z", "go1.26.8"},
		},
		{
			name: "clean checkout",
			bi: debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/xlb-project/xlb", Version: "v1.2.3"},
				Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "abc"}, {Key: "vcs.modified", Value: "false"}}},
			want: []string{"v1.2.3 github.com/xlb-project/xlb", "revision abc,"},
			not:  []string{"modified", "committed"},
		},
		{
			name: "no vcs information",
			bi:   debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/xlb-project/xlb", Version: "(devel)"}},
			want: []string{"revision unknown (built without VCS information)"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := fromBuildInfo(&tt.bi).String()
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("%q lacks %q", got, w)
				}
			}
			for _, n := range tt.not {
				if strings.Contains(got, n) {
					t.Errorf("%q has %q", got, n)
				}
			}
		})
	}
}

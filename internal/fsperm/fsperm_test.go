package fsperm

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlb-project/xlb/internal/testnet"
)

const nobody = 65534

func TestFilePermissions(t *testing.T) {
	testnet.RequirePrivileged(t) // chown needs root
	root := t.TempDir()
	mk := func(path string, mode os.FileMode, uid int, dir bool) string {
		t.Helper()
		path = filepath.Join(root, path)
		var err error
		if dir {
			err = os.Mkdir(path, 0o700)
		} else {
			err = os.WriteFile(path, []byte("x"), 0o600)
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil { // Chmod is not subject to the umask
			t.Fatal(err)
		}
		if err := os.Chown(path, uid, -1); err != nil {
			t.Fatal(err)
		}
		return path
	}
	good := mk("good", 0o755, 0, false)
	mk("sticky", 0o777|os.ModeSticky, 0, true)
	inSticky := mk("sticky/file", 0o644, 0, false)
	mk("open", 0o777, 0, true)
	inOpen := mk("open/file", 0o644, 0, false)
	mk("nobodys", 0o755, nobody, true)
	inNobodys := mk("nobodys/file", 0o644, 0, false)
	mk("sticky-nobody", 0o777|os.ModeSticky, nobody, true)
	inStickyNobody := mk("sticky-nobody/file", 0o644, 0, false)
	mk("group", 0o775, 0, true)
	inGroup := mk("group/file", 0o644, 0, false)
	notRoot := mk("not-root", 0o755, nobody, false)
	groupWritable := mk("group-writable", 0o664, 0, false)
	worldWritable := mk("world-writable", 0o646, 0, false)
	linkToBad := filepath.Join(root, "link-to-bad")
	if err := os.Symlink(worldWritable, linkToBad); err != nil {
		t.Fatal(err)
	}
	linkInOpen := filepath.Join(root, "open", "link-to-good")
	if err := os.Symlink(good, linkInOpen); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name, path string
		want       string // "" for accepted; else a part of the error
		resolved   string
	}{
		{name: "root's file", path: good, resolved: good},
		{name: "in a root-owned sticky directory like /tmp", path: inSticky, resolved: inSticky},
		{name: "link in a world-writable directory to a good file", path: linkInOpen, resolved: good},
		{name: "not root's", path: notRoot, want: "is owned by uid 65534, not root"},
		{name: "group-writable", path: groupWritable, want: "writable by its group (mode 0664)"},
		{name: "world-writable", path: worldWritable, want: "writable by others (mode 0646)"},
		{name: "link to a world-writable file", path: linkToBad, want: worldWritable + "): unsafe"},
		{name: "in a world-writable directory", path: inOpen, want: "directory " + filepath.Dir(inOpen) + " is writable by others (mode 0777)"},
		{name: "in a directory of another user", path: inNobodys, want: "directory " + filepath.Dir(inNobodys) + " is owned by uid 65534"},
		{name: "in a sticky directory of another user", path: inStickyNobody, want: "is owned by uid 65534"},
		{name: "in a group-writable directory", path: inGroup, want: "is writable by its group (mode 0775)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Check(tc.path)
			if tc.want == "" {
				if err != nil || got != tc.resolved {
					t.Fatalf("Check(%s) = %q, %v; want %q", tc.path, got, err, tc.resolved)
				}
				return
			}
			if !errors.Is(err, ErrUnsafe) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Check(%s) = %q, %v; want %v containing %q", tc.path, got, err, ErrUnsafe, tc.want)
			}
			t.Logf("refused: %v", err)
		})
	}
	for _, p := range []string{filepath.Join(root, "missing"), root} {
		if _, err := Check(p); err == nil || errors.Is(err, ErrUnsafe) {
			t.Errorf("Check(%s) = %v, want an error that is not about permissions", p, err)
		}
	}
	t.Run("relative", func(t *testing.T) {
		t.Chdir(root)
		if got, err := Check("good"); err != nil || got != good {
			t.Errorf("Check(good) in %s = %q, %v", root, got, err)
		}
	})
}

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlb-project/xlb/internal/xlbtest"
)

// TestUnsafeFilesRefused: a policy plugin or a chain object that a user
// other than root could have written (the file, or a directory on its
// path) is refused, at start with exit status 2 naming the key, and by
// xlbctl; a plugin-sha256 pin holds whatever name the binary is given.
func TestUnsafeFilesRefused(t *testing.T) {
	ct := newConfigTopo(t, "generic")
	const nobody = 65534
	vip, a := ct.vip.String(), addr(ct.ba, backendPort)
	good := fmt.Sprintf("iface: eth0\nxdp-mode: generic\nservices:\n  - vip: %s\n    backends: [%s]\n", vip, a)
	withPolicy := func(policy string) string {
		return fmt.Sprintf("iface: eth0\nxdp-mode: generic\nservices:\n  - vip: %s\n    policy: %s\n    backends: [%s]\n", vip, policy, a)
	}
	dir, err := xlbtest.Build()
	if err != nil {
		t.Fatal(err)
	}
	random, hash := filepath.Join(dir, "xlb-policy-random"), filepath.Join(dir, "xlb-policy-hash")
	counter := compileBPF(t, "testdata/chain_icmp_count.c", t.TempDir())

	// place copies from into a new directory with the given directory
	// mode, as a file with mode and owner uid.
	place := func(from string, dirMode, mode os.FileMode, uid int) string {
		t.Helper()
		d := filepath.Join(t.TempDir(), "d")
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, dirMode); err != nil {
			t.Fatal(err)
		}
		to := filepath.Join(d, filepath.Base(from))
		copyFile(t, from, to)
		if err := os.Chmod(to, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(to, uid, -1); err != nil {
			t.Fatal(err)
		}
		return to
	}
	nobodysPlugin := place(random, 0o755, 0o755, nobody)
	writablePlugin := place(random, 0o755, 0o757, 0)
	pluginInOpenDir := place(random, 0o777, 0o755, 0)
	nobodysObject := place(counter, 0o755, 0o644, nobody)
	writableObject := place(counter, 0o755, 0o664, 0)
	hashLink := filepath.Join(t.TempDir(), "my-hash")
	if err := os.Symlink(hash, hashLink); err != nil {
		t.Fatal(err)
	}
	wrongPin := "plugin-sha256:\n  hash: \"" + strings.Repeat("0", 64) + "\"\n"

	t.Run("at start", func(t *testing.T) {
		before := lbState(t, ct.lb)
		for _, tc := range []struct {
			name, file string
			want       []string
		}{
			{"plugin owned by another user", withPolicy(nobodysPlugin), []string{"services[0].policy", "owned by uid 65534, not root"}},
			{"world-writable plugin", withPolicy(writablePlugin), []string{"services[0].policy", "writable by others (mode 0757)"}},
			{"plugin in a world-writable directory", withPolicy(pluginInOpenDir), []string{"services[0].policy", "directory " + filepath.Dir(pluginInOpenDir) + " is writable by others"}},
			{"chain object owned by another user", good + "chain:\n  - {name: icmp, object: " + nobodysObject + "}\n", []string{"chain[0].object", "owned by uid 65534"}},
			{"group-writable chain object", good + "chain:\n  - {name: icmp, object: " + writableObject + "}\n", []string{"chain[0].object", "writable by its group (mode 0664)"}},
			{"pin on hash, binary named by its path", withPolicy(hash) + wrongPin, []string{"services[0].policy", "checksum mismatch"}},
			{"pin on hash, binary named by a symbolic link", withPolicy(hashLink) + wrongPin, []string{"services[0].policy", "checksum mismatch"}},
			{"pin on the path, binary named hash", withPolicy("hash") + "plugin-sha256:\n  " + hash + ": \"" + strings.Repeat("0", 64) + "\"\n", []string{"checksum mismatch"}},
		} {
			t.Run(tc.name, func(t *testing.T) { ct.checkRefused(t, before, tc.file, nil, nil, 2, tc.want...) })
		}
	})

	t.Run("by xlbctl", func(t *testing.T) {
		ct.start(t, good+wrongPin)
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"policy", "set", nobodysPlugin}, "owned by uid 65534"},
			{[]string{"policy", "set", writablePlugin}, "writable by others"},
			{[]string{"policy", "set", hash}, "checksum mismatch"},
			{[]string{"policy", "set", hashLink}, "checksum mismatch"},
			{[]string{"policy", "set", "hash"}, "checksum mismatch"},
			{[]string{"chain", "add", "icmp", "--object", nobodysObject}, "owned by uid 65534"},
			{[]string{"chain", "add", "icmp", "--object", writableObject}, "writable by its group"},
		} {
			out, err := ct.topo.xlbctl(t, tc.args...)
			if err == nil || !strings.Contains(out, tc.want) {
				t.Errorf("xlbctl %v: %v, %q; want refused with %q", tc.args, err, out, tc.want)
			}
			t.Logf("xlbctl %v: %s", tc.args, strings.TrimSpace(out))
		}
		st := ct.topo.status(t)
		if st.Services[0].Policy != "random" || len(st.Policies) != 1 || st.Policies[0].Name != "random" {
			t.Errorf("policies after refusals: %+v %+v", st.Services, st.Policies)
		}
		if ms, err := ct.d.Client().ChainList(t.Context()); err != nil || len(ms) != 1 {
			t.Errorf("chain after refusals: %+v, %v", ms, err)
		}
		// The same binaries, root's and not writable, are accepted.
		if out, err := ct.topo.xlbctl(t, "chain", "add", "icmp", "--object", counter); err != nil {
			t.Errorf("xlbctl chain add of a safe object: %v: %s", err, out)
		}
		if out, err := ct.topo.xlbctl(t, "policy", "set", "least-conn"); err != nil {
			t.Errorf("xlbctl policy set least-conn: %v: %s", err, out)
		}
	})
}

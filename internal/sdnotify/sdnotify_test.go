package sdnotify

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func listen(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func read(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return string(buf[:n])
}

func TestNotify(t *testing.T) {
	for _, abstract := range []bool{false, true} {
		name := filepath.Join(t.TempDir(), "notify")
		env := name
		if abstract {
			env = "@xlb-sdnotify-test-" + filepath.Base(t.TempDir())
			name = "\x00" + env[1:]
		}
		c := listen(t, name)
		t.Setenv("NOTIFY_SOCKET", env)
		n := FromEnv()
		if _, ok := os.LookupEnv("NOTIFY_SOCKET"); ok {
			t.Error("NOTIFY_SOCKET still set: plugins would inherit it")
		}
		if err := n.Ready("serving 2 services"); err != nil {
			t.Fatal(err)
		}
		if got := read(t, c); got != "READY=1\nSTATUS=serving 2 services" {
			t.Errorf("abstract=%v: got %q", abstract, got)
		}
		if err := n.Reloading(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, c); !strings.HasPrefix(got, "RELOADING=1\nMONOTONIC_USEC=") {
			t.Errorf("abstract=%v: got %q", abstract, got)
		}
		if err := n.Stopping(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, c); got != "STOPPING=1" {
			t.Errorf("abstract=%v: got %q", abstract, got)
		}
	}
}

func TestNoSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n := FromEnv()
	if n.Enabled() {
		t.Fatal("enabled without NOTIFY_SOCKET")
	}
	if err := n.Ready("x"); err != nil {
		t.Fatal(err)
	}
	var nilN *Notifier
	if err := nilN.Stopping(); err != nil {
		t.Fatal(err)
	}
}

// Package control is the protocol between xlbd and xlbctl: the gRPC service
// of proto/control.proto on a unix socket (docs/api.md). It provides the
// socket (Listen: created with its final owner and mode, never more open),
// the server loop (Serve, which tells handlers who called through Peer) and
// the client (Dial), which turns a failure to reach xlbd into a DialError.
package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	controlpb "github.com/xlb-project/xlb/internal/control/proto"
)

// Listen creates the unix socket at path and listens on it. The socket
// belongs to the calling user (root, for xlbd) with mode 0600, or, with
// gid >= 0, to that group with mode 0660: it is created in a private
// directory, given its owner and mode there, and only then moved to path,
// so it is never reachable with a wider mode. A socket file at path that
// nothing answers on (left by a killed xlbd) is replaced; one that answers
// is an error.
func Listen(path string, gid int) (_ net.Listener, err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen on %s: another xlbd answers there", path)
	}
	tmp, err := os.MkdirTemp(dir, ".xlbd-sock-")
	if err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	staged := filepath.Join(tmp, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: staged, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	// The bound name moves: Serve removes path itself.
	l.SetUnlinkOnClose(false)
	mode := os.FileMode(0o600)
	if gid >= 0 {
		if err := os.Chown(staged, -1, gid); err != nil {
			return nil, fmt.Errorf("give %s to group %d: %w", path, gid, err)
		}
		mode = 0o660
	}
	if err := os.Chmod(staged, mode); err != nil {
		return nil, fmt.Errorf("restrict %s: %w", path, err)
	}
	if err := os.Rename(staged, path); err != nil {
		return nil, fmt.Errorf("move socket to %s: %w", path, err)
	}
	return &socket{UnixListener: l, path: path}, nil
}

// socket removes its path when closed.
type socket struct {
	*net.UnixListener
	path string
	once sync.Once
}

func (s *socket) Close() error {
	err := s.UnixListener.Close()
	s.once.Do(func() { _ = os.Remove(s.path) })
	return err
}

// Serve answers the control API on l until ctx ends, then gives requests
// in flight 5 s and closes l (removing its socket file).
func Serve(ctx context.Context, l net.Listener, srv controlpb.ControlServer) error {
	s := grpc.NewServer(grpc.Creds(peerCreds{}))
	controlpb.RegisterControlServer(s, srv)
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		stopped := make(chan struct{})
		go func() {
			s.GracefulStop()
			close(stopped)
		}()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			s.Stop()
		}
	}()
	err := s.Serve(l)
	<-done
	l.Close()
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}

// PeerInfo is who is at the other end of a control connection, from the
// socket's SO_PEERCRED.
type PeerInfo struct {
	credentials.CommonAuthInfo
	UID, GID uint32
	PID      int32
}

// AuthType implements credentials.AuthInfo.
func (PeerInfo) AuthType() string { return "peercred" }

// Peer returns who made the request handled under ctx.
func Peer(ctx context.Context) (PeerInfo, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return PeerInfo{}, false
	}
	pi, ok := p.AuthInfo.(PeerInfo)
	return pi, ok
}

// peerCreds are transport credentials that add nothing to the connection
// (the socket's mode is the access control) but read the peer's uid, gid
// and pid.
type peerCreds struct{}

func (peerCreds) ClientHandshake(_ context.Context, _ string, c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, PeerInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
}

func (peerCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	info := PeerInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return c, info, nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, nil, fmt.Errorf("read peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return nil, nil, fmt.Errorf("read peer credentials: %w", err)
	}
	if cerr != nil {
		return nil, nil, fmt.Errorf("read peer credentials: %w", cerr)
	}
	info.UID, info.GID, info.PID = cred.Uid, cred.Gid, cred.Pid
	return c, info, nil
}

func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}

func (peerCreds) Clone() credentials.TransportCredentials { return peerCreds{} }

func (peerCreds) OverrideServerName(string) error { return nil }

// Client is a connection to xlbd's control API. Its methods are
// controlpb.ControlClient's; an error is a *DialError when xlbd could not
// be reached, else an *Error with xlbd's answer.
type Client struct {
	controlpb.ControlClient
	conn *grpc.ClientConn
	path string

	mu      sync.Mutex
	dialErr error // the last failure to connect to the socket
}

// Dial returns a client for the socket at path. It does not connect until
// the first call.
func Dial(path string) (*Client, error) {
	c := &Client{path: path}
	conn, err := grpc.NewClient("passthrough:///xlbd",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			nc, err := d.DialContext(ctx, "unix", path)
			c.mu.Lock()
			c.dialErr = err
			c.mu.Unlock()
			return nc, err
		}),
		grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return c.translate(invoker(ctx, method, req, reply, cc, opts...))
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("reach xlbd at %s: %w", path, err)
	}
	c.conn = conn
	c.ControlClient = controlpb.NewControlClient(conn)
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Status fetches xlbd's status.
func (c *Client) Status(ctx context.Context) (*controlpb.Status, error) {
	return c.GetStatus(ctx, &controlpb.GetStatusRequest{})
}

// Error is xlbd's answer to a request it refused or failed.
type Error struct {
	Code    codes.Code
	Message string
}

func (e *Error) Error() string { return e.Message }

// DialError says that xlbd could not be reached on its socket; Err is the
// cause (wrapping syscall errors such as ENOENT, ECONNREFUSED or EACCES,
// or context.DeadlineExceeded).
type DialError struct {
	Socket string
	Err    error
}

func (e *DialError) Error() string { return fmt.Sprintf("reach xlbd at %s: %v", e.Socket, e.Err) }

func (e *DialError) Unwrap() error { return e.Err }

func (c *Client) translate(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	switch st.Code() {
	case codes.Unavailable:
		c.mu.Lock()
		derr := c.dialErr
		c.mu.Unlock()
		if derr != nil {
			return &DialError{Socket: c.path, Err: derr}
		}
		return &DialError{Socket: c.path, Err: errors.New(st.Message())}
	case codes.DeadlineExceeded:
		return &DialError{Socket: c.path, Err: context.DeadlineExceeded}
	case codes.Canceled:
		return &DialError{Socket: c.path, Err: context.Canceled}
	}
	return &Error{Code: st.Code(), Message: st.Message()}
}

// ConnStates are the states a connection is reported in: TCP's five, and
// udp for every UDP flow.
var ConnStates = []string{"syn", "syn-recv", "established", "fin", "closed", "udp"}

// ConnProtocols are the protocols a connection is reported with.
var ConnProtocols = []string{"tcp", "udp"}

// ValidateConnFilter checks that a ListConns request's filters are well
// formed.
func ValidateConnFilter(f *controlpb.ListConnsRequest) error {
	for _, x := range []struct{ name, v string }{{"vip", f.GetVip()}, {"backend", f.GetBackend()}} {
		if x.v == "" {
			continue
		}
		if _, err := netip.ParseAddrPort(x.v); err != nil {
			return fmt.Errorf("%s filter %q is not IP:PORT", x.name, x.v)
		}
	}
	if s := f.GetState(); s != "" && !slices.Contains(ConnStates, s) {
		return fmt.Errorf("state filter %q is not one of %s", s, strings.Join(ConnStates, ", "))
	}
	if p := f.GetProtocol(); p != "" && !slices.Contains(ConnProtocols, p) {
		return fmt.Errorf("protocol filter %q is not one of %s", p, strings.Join(ConnProtocols, ", "))
	}
	return nil
}

// MatchConn tells whether c passes the request's filters.
func MatchConn(f *controlpb.ListConnsRequest, c *controlpb.Conn) bool {
	return (f.GetVip() == "" || f.GetVip() == c.GetVip()) && (f.GetBackend() == "" || f.GetBackend() == c.GetBackend()) &&
		(f.GetState() == "" || f.GetState() == c.GetState()) && (f.GetProtocol() == "" || f.GetProtocol() == c.GetProtocol())
}

// Conns lists every tracked connection.
func (c *Client) Conns(ctx context.Context) ([]*controlpb.Conn, error) {
	r, err := c.ListConns(ctx, &controlpb.ListConnsRequest{})
	return r.GetConns(), err
}

// Stop asks xlbd to stop (the Shutdown call); with keepDatapath its data
// path keeps forwarding, pinned for the next xlbd.
func (c *Client) Stop(ctx context.Context, keepDatapath bool) error {
	_, err := c.Shutdown(ctx, &controlpb.ShutdownRequest{KeepDatapath: keepDatapath})
	return err
}

// ChainList lists the chain in the order it runs.
func (c *Client) ChainList(ctx context.Context) ([]*controlpb.ChainMember, error) {
	r, err := c.ListChain(ctx, &controlpb.ListChainRequest{})
	return r.GetMembers(), err
}

package plugins

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	policypb "github.com/xlb-project/xlb/plugins/proto"
)

// GRPCPlugin is the go-plugin plugin.GRPCPlugin of a policy. On the plugin
// side Impl and Info are what is served; on the host side both are unused.
type GRPCPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	Info Info
	Impl Policy
	// Logger, when set, logs every Select served (plugin side).
	Logger *slog.Logger
}

var _ plugin.GRPCPlugin = (*GRPCPlugin)(nil)

// PluginMap returns the go-plugin plugin set holding one policy under
// PluginName. The host passes PluginMap(Info{}, nil).
func PluginMap(info Info, p Policy) map[string]plugin.Plugin {
	return map[string]plugin.Plugin{PluginName: &GRPCPlugin{Info: info, Impl: p}}
}

// GRPCServer registers the policy's gRPC service (plugin side).
func (p *GRPCPlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	policypb.RegisterPolicyServer(s, &grpcServer{info: p.Info, impl: p.Impl, log: p.Logger})
	return nil
}

// GRPCClient returns the host's view of the policy, a *grpcClient.
func (p *GRPCPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (any, error) {
	return &grpcClient{rpc: policypb.NewPolicyClient(c)}, nil
}

// grpcServer serves a Policy over gRPC.
type grpcServer struct {
	policypb.UnimplementedPolicyServer
	info Info
	impl Policy
	log  *slog.Logger
}

func (s *grpcServer) Info(context.Context, *policypb.InfoRequest) (*policypb.InfoResponse, error) {
	return &policypb.InfoResponse{
		Name:       s.info.Name,
		Version:    s.info.Version,
		ApiVersion: uint32(s.info.APIVersion),
		Needs: &policypb.Needs{
			LiveLoad:          s.info.Needs.LiveLoad,
			RefreshIntervalMs: uint32(s.info.Needs.RefreshInterval.Milliseconds()),
		},
	}, nil
}

func (s *grpcServer) Select(ctx context.Context, in *policypb.SelectRequest) (*policypb.SelectResponse, error) {
	req, err := requestFromProto(in)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	req.APIVersion = s.info.APIVersion
	sel, err := s.impl.Select(ctx, req)
	if errors.Is(err, ErrNoBackends) && s.info.APIVersion >= 2 {
		// The "no backend" answer: an empty table.
		if s.log != nil {
			s.log.Debug("select", "service", req.Service.String(), "backends", len(req.Backends), "answer", "no backend")
		}
		return &policypb.SelectResponse{}, nil
	}
	if err != nil {
		if s.log != nil {
			s.log.Warn("select", "service", req.Service.String(), "backends", len(req.Backends), "error", err.Error())
		}
		return nil, err
	}
	if s.log != nil {
		s.log.Debug("select", "service", req.Service.String(), "backends", len(req.Backends),
			"mode", sel.Mode.String(), "table_len", len(sel.Table))
	}
	return &policypb.SelectResponse{Mode: policypb.Mode(sel.Mode), Table: sel.Table}, nil
}

// grpcClient is the host's Policy: it calls the plugin over gRPC.
type grpcClient struct {
	rpc policypb.PolicyClient
}

func (c *grpcClient) Info(ctx context.Context) (Info, error) {
	resp, err := c.rpc.Info(ctx, &policypb.InfoRequest{})
	if err != nil {
		return Info{}, err
	}
	return Info{
		Name:       resp.GetName(),
		Version:    resp.GetVersion(),
		APIVersion: int(resp.GetApiVersion()),
		Needs: Needs{
			LiveLoad:        resp.GetNeeds().GetLiveLoad(),
			RefreshInterval: time.Duration(resp.GetNeeds().GetRefreshIntervalMs()) * time.Millisecond,
		},
	}, nil
}

func (c *grpcClient) Select(ctx context.Context, req Request) (Selection, error) {
	in, err := requestToProto(req)
	if err != nil {
		return Selection{}, err
	}
	resp, err := c.rpc.Select(ctx, in)
	if err != nil {
		return Selection{}, err
	}
	return Selection{Mode: Mode(resp.GetMode()), Table: resp.GetTable()}, nil
}

func addrToProto(ap netip.AddrPort) *policypb.AddrPort {
	return &policypb.AddrPort{Ip: ap.Addr().AsSlice(), Port: uint32(ap.Port())}
}

func addrFromProto(p *policypb.AddrPort) (netip.AddrPort, error) {
	ip, ok := netip.AddrFromSlice(p.GetIp())
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("address of %d bytes, want 4 or 16", len(p.GetIp()))
	}
	if p.GetPort() > 65535 {
		return netip.AddrPort{}, fmt.Errorf("port %d out of range", p.GetPort())
	}
	return netip.AddrPortFrom(ip, uint16(p.GetPort())), nil
}

func requestToProto(req Request) (*policypb.SelectRequest, error) {
	if !req.Service.IsValid() {
		return nil, fmt.Errorf("service: invalid address %s", req.Service)
	}
	out := &policypb.SelectRequest{
		Service:  addrToProto(req.Service),
		Backends: make([]*policypb.Backend, len(req.Backends)),
	}
	for i, b := range req.Backends {
		if !b.Address.IsValid() {
			return nil, fmt.Errorf("backend %d: invalid address %s", i, b.Address)
		}
		out.Backends[i] = &policypb.Backend{
			Address:   addrToProto(b.Address),
			Weight:    b.Weight,
			Active:    b.Active,
			NewPerSec: b.NewPerSec,
			// What a version 1 plugin reads: no new connections.
			Draining: b.State != StateUp,
			State:    policypb.BackendState(b.State),
			Health:   policypb.BackendHealth(b.Health),
		}
	}
	return out, nil
}

func requestFromProto(in *policypb.SelectRequest) (Request, error) {
	svc, err := addrFromProto(in.GetService())
	if err != nil {
		return Request{}, fmt.Errorf("service: %w", err)
	}
	req := Request{Service: svc, Backends: make([]Backend, len(in.GetBackends()))}
	for i, b := range in.GetBackends() {
		addr, err := addrFromProto(b.GetAddress())
		if err != nil {
			return Request{}, fmt.Errorf("backend %d: %w", i, err)
		}
		state := BackendState(b.GetState())
		if state == StateUp && b.GetDraining() {
			state = StateDraining // a version 1 host knows no other state
		}
		req.Backends[i] = Backend{
			Address:   addr,
			Weight:    b.GetWeight(),
			Active:    b.GetActive(),
			NewPerSec: b.GetNewPerSec(),
			State:     state,
			Health:    Health(b.GetHealth()),
		}
	}
	return req, nil
}

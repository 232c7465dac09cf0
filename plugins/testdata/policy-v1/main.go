// Command policy-v1 is a policy plugin as the version 1 SDK built them, for
// the compatibility tests: it offers only protocol version 1 in the go-plugin
// handshake, reports api_version 1 and no needs, and reads only the version 1
// fields (it leaves out backends marked draining). It serves the protocol's
// gRPC service directly, without the current SDK's adapters.
package main

import (
	"context"
	"os"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/xlb-project/xlb/plugins"
	policypb "github.com/xlb-project/xlb/plugins/proto"
)

type v1 struct {
	plugin.NetRPCUnsupportedPlugin
}

func (v1) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	policypb.RegisterPolicyServer(s, server{})
	return nil
}

func (v1) GRPCClient(context.Context, *plugin.GRPCBroker, *grpc.ClientConn) (any, error) {
	return nil, nil
}

type server struct {
	policypb.UnimplementedPolicyServer
}

func (server) Info(context.Context, *policypb.InfoRequest) (*policypb.InfoResponse, error) {
	return &policypb.InfoResponse{Name: "v1", Version: "1.0.0", ApiVersion: 1}, nil
}

// Select lists every backend that is not draining once, in random mode.
func (server) Select(_ context.Context, in *policypb.SelectRequest) (*policypb.SelectResponse, error) {
	out := &policypb.SelectResponse{Mode: policypb.Mode_MODE_RANDOM}
	for i, b := range in.GetBackends() {
		if !b.GetDraining() && b.GetWeight() > 0 {
			out.Table = append(out.Table, uint32(i))
		}
	}
	return out, nil
}

func main() {
	hs := plugins.Handshake
	hs.ProtocolVersion = 1
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: hs,
		Plugins:         map[string]plugin.Plugin{plugins.PluginName: v1{}},
		GRPCServer:      plugin.DefaultGRPCServer,
	})
	os.Exit(0)
}

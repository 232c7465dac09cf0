// Command policy-misbehave is a policy plugin that misbehaves on purpose,
// for xlbd's tests. Built as "policy-nonsense" it names a backend that does
// not exist; as "policy-hang" it never answers.
package main

import (
	"context"
	"os"
	"path/filepath"

	"github.com/xlb-project/xlb/plugins"
)

type misbehave struct{ hang bool }

func (m misbehave) Select(ctx context.Context, req plugins.Request) (plugins.Selection, error) {
	if m.hang {
		<-ctx.Done()
		select {} // ignore even the cancellation
	}
	return plugins.Selection{Mode: plugins.ModeRandom, Table: []uint32{0, uint32(len(req.Backends) + 7)}}, nil
}

func main() {
	name := filepath.Base(os.Args[0])
	plugins.Serve(plugins.Info{Name: name, Version: "0.0.1", APIVersion: plugins.ProtocolVersion},
		misbehave{hang: name == "policy-hang"})
}

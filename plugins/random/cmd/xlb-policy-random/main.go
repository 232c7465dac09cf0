// Command xlb-policy-random serves the weighted random policy
// (package random) as an xlb policy plugin. xlbd starts it; run by hand it
// only says so.
package main

import (
	"github.com/xlb-project/xlb/plugins"
	"github.com/xlb-project/xlb/plugins/random"
)

func main() {
	plugins.Serve(plugins.Info{Name: random.Name, Version: random.Version, Needs: random.Needs}, random.Policy{})
}

// Command xlb-policy-hash serves the Maglev consistent hashing policy
// (package hash) as an xlb policy plugin. xlbd starts it; run by hand it
// only says so.
package main

import (
	"github.com/xlb-project/xlb/plugins"
	"github.com/xlb-project/xlb/plugins/hash"
)

func main() {
	plugins.Serve(plugins.Info{Name: hash.Name, Version: hash.Version, Needs: hash.Needs}, hash.Policy{})
}

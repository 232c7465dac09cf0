// Command xlb-policy-least-conn serves the least-connections policy
// (package leastconn) as an xlb policy plugin. xlbd starts it; run by hand
// it only says so.
package main

import (
	"github.com/xlb-project/xlb/plugins"
	"github.com/xlb-project/xlb/plugins/leastconn"
)

func main() {
	plugins.Serve(plugins.Info{Name: leastconn.Name, Version: leastconn.Version, Needs: leastconn.Needs}, leastconn.Policy{})
}

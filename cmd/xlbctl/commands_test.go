package main

import (
	"io"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// cliCommands lists xlbctl's commands as word paths ("status", "chain
// add"), read from its cobra tree: the commands that run, not the groups
// (a group is the first words of its commands' paths).
func cliCommands(t *testing.T) [][]string {
	t.Helper()
	root := newRoot(io.Discard, io.Discard)
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	var out [][]string
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if !c.HasSubCommands() {
			out = append(out, strings.Fields(c.CommandPath())[1:])
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	for _, c := range root.Commands() {
		walk(c)
	}
	return out
}

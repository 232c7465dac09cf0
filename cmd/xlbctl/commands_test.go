package main

import (
	"regexp"
	"strings"
	"testing"
)

var optional = regexp.MustCompile(`\[[^\]]*\]`)

// cliCommands lists xlbctl's commands as word paths ("status", "chain
// add"), read from xlbctl's own usage message: each alternative's leading
// lower-case words.
func cliCommands(t *testing.T) [][]string {
	t.Helper()
	usage, ok := strings.CutPrefix(errUsage.Error(), "usage: xlbctl ")
	if !ok {
		t.Fatalf("xlbctl's usage message changed: %q", errUsage)
	}
	usage = optional.ReplaceAllString(usage, "")
	var out [][]string
	for alt := range strings.SplitSeq(usage, " | ") {
		var words []string
		for _, w := range strings.Fields(alt) {
			if w != strings.ToLower(w) || strings.HasPrefix(w, "-") {
				break
			}
			words = append(words, w)
		}
		if len(words) > 0 {
			out = append(out, words)
		}
	}
	return out
}

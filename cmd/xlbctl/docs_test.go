package main

import (
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// TestDocsNameWhatExists keeps the documentation honest: every counter,
// configuration key and xlbctl command that README.md, docs/ and the
// plugins' READMEs name in code (`...` or a fenced block) exists. The
// counters come from enum xlb_stat in the pipeline object's BTF, the keys
// from internal/config's Config (its mapstructure tags), the commands from
// xlbctl's cobra tree (cliCommands).
func TestDocsNameWhatExists(t *testing.T) {
	docs := readDocs(t)
	counters := btfCounters(t)
	keys := configKeys(reflect.TypeFor[config.Config](), "")
	cmds := cliCommands(t)
	if len(docs) < 5 || len(counters) < 20 || len(keys) < 20 || len(cmds) < 5 {
		t.Fatalf("read %d documents, %d counters, %d keys, %d commands: too few to be right", len(docs), len(counters), len(keys), len(cmds))
	}
	checked := map[string]int{}
	for _, d := range docs {
		for _, c := range d.code {
			for _, name := range counterMentions(c) {
				checked["counter"]++
				if !counters[name] {
					t.Errorf("%s:%d: counter %s is not in enum xlb_stat", d.path, c.line, name)
				}
			}
			for _, key := range keyMentions(c.text, keys) {
				checked["key"]++
				if !keyExists(keys, key) {
					t.Errorf("%s:%d: configuration key %s does not exist", d.path, c.line, key)
				}
			}
			for _, words := range commandMentions(c.text) {
				checked["command"]++
				if why := commandExists(cmds, words); why != "" {
					t.Errorf("%s:%d: xlbctl %s: %s", d.path, c.line, strings.Join(words, " "), why)
				}
			}
		}
		for _, y := range d.yaml {
			for _, key := range yamlKeys(y.text, keys) {
				checked["key"]++
				if !keyExists(keys, key) {
					t.Errorf("%s:%d: configuration key %s (YAML example) does not exist", d.path, y.line, key)
				}
			}
		}
	}
	t.Logf("checked mentions: %v", checked)
	for _, kind := range []string{"counter", "key", "command"} {
		if checked[kind] == 0 {
			t.Errorf("no %s mention found in the docs: the scanner is broken", kind)
		}
	}
}

// doc is a markdown file's code: inline spans, table cells in code, and
// fenced blocks (YAML ones apart).
type doc struct {
	path string
	code []snippet
	yaml []snippet
}

type snippet struct {
	text   string
	line   int
	column string // for a table cell: its column's header
}

var codeSpan = regexp.MustCompile("`([^`]+)`")

func readDocs(t *testing.T) []doc {
	t.Helper()
	root, err := xlbtest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	var out []doc
	err = filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if e.IsDir() && (strings.HasPrefix(e.Name(), ".") && rel != "." || rel == filepath.Join("programs", "include", "bpf")) {
			return filepath.SkipDir // git, and libbpf's vendored headers
		}
		if e.IsDir() || !strings.HasSuffix(path, ".md") {
			return nil
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		out = append(out, parseDoc(rel, string(raw)))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func parseDoc(path, text string) doc {
	d := doc{path: path}
	var fence *snippet
	var fenceLang string
	var header []string
	for i, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			if fence == nil {
				fence = &snippet{line: i + 1}
				fenceLang = strings.TrimPrefix(strings.TrimSpace(line), "```")
			} else {
				if fenceLang == "yaml" {
					d.yaml = append(d.yaml, *fence)
				} else {
					for j, l := range strings.Split(fence.text, "\n") {
						d.code = append(d.code, snippet{text: l, line: fence.line + 1 + j})
					}
				}
				fence = nil
			}
			continue
		}
		if fence != nil {
			fence.text += line + "\n"
			continue
		}
		cells := tableCells(line)
		switch {
		case cells == nil:
			header = nil
		case header == nil:
			header = cells
		}
		if cells != nil {
			for c, cell := range cells {
				col := ""
				if c < len(header) {
					col = strings.ToLower(header[c])
				}
				for _, m := range codeSpan.FindAllStringSubmatch(cell, -1) {
					d.code = append(d.code, snippet{text: m[1], line: i + 1, column: col})
				}
			}
			continue
		}
		for _, m := range codeSpan.FindAllStringSubmatch(line, -1) {
			d.code = append(d.code, snippet{text: m[1], line: i + 1})
		}
	}
	return d
}

// tableCells splits a markdown table row, or returns nil.
func tableCells(line string) []string {
	line = strings.TrimSpace(line)
	if !strings.HasPrefix(line, "|") || !strings.HasSuffix(line, "|") {
		return nil
	}
	cells := strings.Split(strings.Trim(line, "|"), "|")
	for i := range cells {
		cells[i] = strings.TrimSpace(cells[i])
	}
	return cells
}

// btfCounters are the counter names as xlbd reports them.
func btfCounters(t *testing.T) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	for _, v := range xlbtest.PipelineEnum(t, "xlb_stat") {
		if v.Name != "XLB_STAT_MAX" {
			out[strings.ToLower(strings.TrimPrefix(v.Name, "XLB_STAT_"))] = true
		}
	}
	return out
}

var counterLike = regexp.MustCompile(`^(drop|pass|rst|syn|untrusted|tailcall)_[a-z0-9_]+$`)
var identifier = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)

// counterMentions returns the counters a snippet names: any code that
// looks like one (drop_..., pass_..., ...), and any identifier in a table
// column of counters.
func counterMentions(s snippet) []string {
	text := strings.TrimSpace(s.text)
	if counterLike.MatchString(text) || strings.HasPrefix(s.column, "counter") && identifier.MatchString(text) {
		return []string{text}
	}
	return nil
}

// configKeys lists every key path of a configuration type: "iface",
// "conntrack.timeouts.syn", "services[].backends[].weight"; a map's keys
// are "plugin-sha256.*".
func configKeys(typ reflect.Type, prefix string) []string {
	var out []string
	for f := range typ.Fields() {
		tag := strings.Split(f.Tag.Get("mapstructure"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		key := prefix + tag
		out = append(out, key)
		ft := f.Type
		for ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		switch {
		case ft.Kind() == reflect.Struct && hasTags(ft):
			out = append(out, configKeys(ft, key+".")...)
		case ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct && hasTags(ft.Elem()):
			out = append(out, configKeys(ft.Elem(), key+"[].")...)
		case ft.Kind() == reflect.Map:
			out = append(out, key+".*")
		}
	}
	return out
}

func hasTags(typ reflect.Type) bool {
	for f := range typ.Fields() {
		if f.Tag.Get("mapstructure") != "" {
			return true
		}
	}
	return false
}

var keyLike = regexp.MustCompile(`^[a-z][a-z0-9-]*(\.[a-z0-9*-]+|\[[0-9]*\])*$`)
var index = regexp.MustCompile(`\[[0-9]*\]`)
var fileName = regexp.MustCompile(`\.(proto|md|go|c|h|o|yaml|yml|json|sh)$`)

// keyMentions returns the configuration keys a piece of code names: a
// dotted name whose first part is a top-level key, such as
// conntrack.timeouts.syn or services[0].vip.
func keyMentions(code string, keys []string) []string {
	code = strings.TrimSpace(code)
	if !keyLike.MatchString(code) || !strings.ContainsAny(code, ".[") || fileName.MatchString(code) {
		return nil
	}
	top := strings.FieldsFunc(code, func(r rune) bool { return r == '.' || r == '[' })[0]
	if !slices.Contains(keys, top) {
		return nil
	}
	return []string{index.ReplaceAllString(code, "[]")}
}

// keyExists reports whether key is a key path or leads to one.
func keyExists(keys []string, key string) bool {
	for _, k := range keys {
		if k == key || strings.HasPrefix(k, key+".") || strings.HasPrefix(k, key+"[]") {
			return true
		}
		if base, ok := strings.CutSuffix(k, ".*"); ok && strings.HasPrefix(key, base+".") {
			return true
		}
	}
	return false
}

// yamlKeys returns the key paths of a YAML example that is an xlbd
// configuration (one of its top-level keys is one of xlbd's).
func yamlKeys(text string, keys []string) []string {
	var root map[string]any
	if yaml.Unmarshal([]byte(text), &root) != nil || root == nil {
		return nil
	}
	ours := false
	for k := range root {
		ours = ours || slices.Contains(keys, k)
	}
	if !ours {
		return nil
	}
	var out []string
	var walk func(v any, prefix string)
	walk = func(v any, prefix string) {
		switch v := v.(type) {
		case map[string]any:
			for k, sub := range v {
				out = append(out, prefix+k)
				if !strings.HasSuffix(prefix+k, "plugin-sha256") {
					walk(sub, prefix+k+".")
				}
			}
		case []any:
			for _, sub := range v {
				walk(sub, strings.TrimSuffix(prefix, ".")+"[].")
			}
		}
	}
	walk(root, "")
	return out
}

var xlbctlCall = regexp.MustCompile(`(?:^|[\s/])xlbctl((?:\s+[^\s|;&]+)*)`)

// commandMentions returns the words after each "xlbctl" in a piece of
// code, flags left out.
func commandMentions(code string) [][]string {
	var out [][]string
	for _, m := range xlbctlCall.FindAllStringSubmatch(code, -1) {
		var words []string
		args := strings.Fields(m[1])
		for i := 0; i < len(args); i++ {
			a := args[i]
			if strings.HasPrefix(a, "-") {
				if (a == "--socket" || a == "--timeout") && i+1 < len(args) {
					i++ // the flag's value
				}
				continue
			}
			if strings.HasPrefix(a, "[") || strings.HasPrefix(a, "$") || strings.HasPrefix(a, "<") || strings.HasPrefix(a, "#") {
				break
			}
			words = append(words, a)
		}
		out = append(out, words)
	}
	return out
}

// commandExists says why words do not start with an xlbctl command, or ""
// when they do: the words start with a command's path, or are the first
// words of one (a group). Words after a command are its arguments.
func commandExists(cmds [][]string, words []string) string {
	if len(words) == 0 {
		return "" // xlbctl itself
	}
	for _, c := range cmds {
		n := min(len(c), len(words))
		if slices.Equal(c[:n], words[:n]) {
			return ""
		}
	}
	for _, c := range cmds {
		if c[0] == words[0] {
			return "no such command in its group"
		}
	}
	return "no such command"
}

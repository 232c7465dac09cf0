package plugins

import (
	"bytes"
	"context"
	"io"
	stdlog "log"
	"log/slog"
	"os"
	"strings"
	"sync"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
)

// Serve serves policy p as a go-plugin gRPC plugin and returns when the host
// ends it. It is the whole main of a policy plugin:
//
//	func main() { plugins.Serve(plugins.Info{Name: "wrr", Version: "0.1.0"}, wrr{}) }
//
// info.APIVersion is the newest API version the policy implements (0 means
// ProtocolVersion); Serve serves every version from MinProtocolVersion up
// to it, and go-plugin's handshake picks the newest one the host also
// speaks. Serve sets slog's default
// logger to one that writes hclog JSON to the process's standard error,
// where the host reads it and passes each record to its own logger with the
// key "plugin"; a plugin logs with slog.Default() (or the slog package
// functions). Run by hand, outside xlbd, the binary says so and exits 1.
func Serve(info Info, p Policy) {
	if info.APIVersion == 0 {
		info.APIVersion = ProtocolVersion
	}
	// go-plugin replaces os.Stderr with a pipe while serving; loggers keep
	// the real standard error, which the host parses line by line.
	stderr := os.Stderr
	log := slog.New(NewPluginLogHandler(stderr, slog.LevelDebug))
	slog.SetDefault(log)

	versions := make(map[int]plugin.PluginSet)
	for v := MinProtocolVersion; v <= info.APIVersion; v++ {
		vi := info
		vi.APIVersion = v
		versions[v] = plugin.PluginSet{PluginName: &servedPlugin{GRPCPlugin{Info: vi, Impl: p, Logger: log}}}
	}
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig:  Handshake,
		VersionedPlugins: versions,
		GRPCServer:       plugin.DefaultGRPCServer,
		Logger: hclog.New(&hclog.LoggerOptions{
			Name:       info.Name,
			Level:      hclog.Info,
			Output:     stderr,
			JSONFormat: true,
		}),
	})
}

// servedPlugin logs once the policy is registered, that is once the
// handshake with a host has begun.
type servedPlugin struct{ GRPCPlugin }

func (p *servedPlugin) GRPCServer(b *plugin.GRPCBroker, s *grpc.Server) error {
	p.Logger.Info("serving policy", "name", p.Info.Name, "version", p.Info.Version,
		"api_version", p.Info.APIVersion, "pid", os.Getpid())
	return p.GRPCPlugin.GRPCServer(b, s)
}

// NewPluginLogHandler returns a slog.Handler writing records as hclog JSON
// lines ("@level", "@message", "@timestamp" and the attributes) to w, the
// form go-plugin's host parses from a plugin's standard error. Serve
// installs one; it is exported for plugins that build their own logger.
func NewPluginLogHandler(w io.Writer, level slog.Leveler) slog.Handler {
	return slog.NewJSONHandler(w, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) > 0 {
				return a
			}
			switch a.Key {
			case slog.TimeKey:
				return slog.String("@timestamp", a.Value.Time().Format("2006-01-02T15:04:05.000000Z07:00"))
			case slog.LevelKey:
				l, _ := a.Value.Any().(slog.Level)
				return slog.String("@level", hclogLevelName(l))
			case slog.MessageKey:
				return slog.String("@message", a.Value.String())
			}
			return a
		},
	})
}

func hclogLevelName(l slog.Level) string {
	switch {
	case l < slog.LevelDebug:
		return "trace"
	case l < slog.LevelInfo:
		return "debug"
	case l < slog.LevelWarn:
		return "info"
	case l < slog.LevelError:
		return "warn"
	default:
		return "error"
	}
}

// levelTrace is hclog's Trace level in slog terms.
const levelTrace = slog.LevelDebug - 4

// slogHCLog is an hclog.Logger that writes to a *slog.Logger: go-plugin logs
// through it, including every line a plugin writes to its standard error.
type slogHCLog struct {
	log     *slog.Logger
	name    string
	implied []any
}

var _ hclog.Logger = (*slogHCLog)(nil)

func newSlogHCLog(l *slog.Logger) *slogHCLog { return &slogHCLog{log: l} }

func slogLevel(l hclog.Level) slog.Level {
	switch l {
	case hclog.Trace:
		return levelTrace
	case hclog.Debug:
		return slog.LevelDebug
	case hclog.Warn:
		return slog.LevelWarn
	case hclog.Error:
		return slog.LevelError
	default:
		return slog.LevelInfo
	}
}

func (l *slogHCLog) Log(level hclog.Level, msg string, args ...any) {
	lvl := slogLevel(level)
	ctx := context.Background()
	if !l.log.Enabled(ctx, lvl) {
		return
	}
	all := make([]any, 0, len(l.implied)+len(args)+2)
	if l.name != "" {
		all = append(all, "logger", l.name)
	}
	all = append(all, l.implied...)
	all = append(all, args...)
	for i := 0; i+1 < len(all); i += 2 {
		// go-plugin's own "plugin" key holds the executable's path; the
		// host's logger already has "plugin" (its name).
		if k, ok := all[i].(string); ok && k == "plugin" {
			all[i] = "plugin_path"
		}
	}
	l.log.Log(ctx, lvl, msg, all...)
}

func (l *slogHCLog) Trace(msg string, args ...any) { l.Log(hclog.Trace, msg, args...) }
func (l *slogHCLog) Debug(msg string, args ...any) { l.Log(hclog.Debug, msg, args...) }
func (l *slogHCLog) Info(msg string, args ...any)  { l.Log(hclog.Info, msg, args...) }
func (l *slogHCLog) Warn(msg string, args ...any)  { l.Log(hclog.Warn, msg, args...) }
func (l *slogHCLog) Error(msg string, args ...any) { l.Log(hclog.Error, msg, args...) }

func (l *slogHCLog) enabled(level hclog.Level) bool {
	return l.log.Enabled(context.Background(), slogLevel(level))
}

func (l *slogHCLog) IsTrace() bool { return l.enabled(hclog.Trace) }
func (l *slogHCLog) IsDebug() bool { return l.enabled(hclog.Debug) }
func (l *slogHCLog) IsInfo() bool  { return l.enabled(hclog.Info) }
func (l *slogHCLog) IsWarn() bool  { return l.enabled(hclog.Warn) }
func (l *slogHCLog) IsError() bool { return l.enabled(hclog.Error) }

func (l *slogHCLog) ImpliedArgs() []any { return l.implied }

func (l *slogHCLog) With(args ...any) hclog.Logger {
	n := *l
	n.implied = append(append([]any(nil), l.implied...), args...)
	return &n
}

func (l *slogHCLog) Name() string { return l.name }

func (l *slogHCLog) Named(name string) hclog.Logger {
	n := *l
	if n.name != "" {
		n.name += "." + name
	} else {
		n.name = name
	}
	return &n
}

func (l *slogHCLog) ResetNamed(name string) hclog.Logger {
	n := *l
	n.name = name
	return &n
}

// SetLevel does nothing: the slog handler decides.
func (l *slogHCLog) SetLevel(hclog.Level) {}

// GetLevel returns the lowest level the slog handler takes; go-plugin skips
// plugin log lines below it without parsing them.
func (l *slogHCLog) GetLevel() hclog.Level {
	for _, lvl := range []hclog.Level{hclog.Trace, hclog.Debug, hclog.Info, hclog.Warn, hclog.Error} {
		if l.enabled(lvl) {
			return lvl
		}
	}
	return hclog.Off
}

func (l *slogHCLog) StandardLogger(opts *hclog.StandardLoggerOptions) *stdlog.Logger {
	return stdlog.New(l.StandardWriter(opts), "", 0)
}

func (l *slogHCLog) StandardWriter(*hclog.StandardLoggerOptions) io.Writer {
	return &lineLogger{log: l, level: hclog.Info}
}

// lineLogger logs each line written to it.
type lineLogger struct {
	mu    sync.Mutex
	log   hclog.Logger
	level hclog.Level
	buf   []byte
}

func (w *lineLogger) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		if line := strings.TrimRight(string(w.buf[:i]), "\r"); line != "" {
			w.log.Log(w.level, line)
		}
		w.buf = w.buf[i+1:]
	}
	return len(p), nil
}

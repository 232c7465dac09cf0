// Package policypb is the generated gRPC code of the xlb policy plugin
// protocol (policy.proto). Regenerate it with `go generate ./plugins`; use
// the plugins package rather than this one.
package policypb

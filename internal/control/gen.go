package control

// Regenerate the gRPC code of the control API (needs protoc; the two Go
// generators are tools pinned in go.mod). The output is committed, so a plain
// go build needs neither.
//
//go:generate sh -c "protoc --plugin=protoc-gen-go=$(go tool -n protoc-gen-go) --plugin=protoc-gen-go-grpc=$(go tool -n protoc-gen-go-grpc) --proto_path=proto --go_out=proto --go_opt=paths=source_relative --go-grpc_out=proto --go-grpc_opt=paths=source_relative control.proto"

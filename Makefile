# xlb: build, generate, test, benchmark and demo.
# `sudo make demo` and `sudo make test` are the README's two commands.
SHELL := /bin/bash
GO    ?= go
BIN   := bin
# Binaries and the packages they come from.
CMDS := xlbd:./cmd/xlbd xlbctl:./cmd/xlbctl xlb-demo:./cmd/xlb-demo
PLUGINS := xlb-policy-random:./plugins/random/cmd/xlb-policy-random \
	xlb-policy-hash:./plugins/hash/cmd/xlb-policy-hash \
	xlb-policy-least-conn:./plugins/leastconn/cmd/xlb-policy-least-conn
TESTLOG ?= $(BIN)/test.log

.PHONY: all deps build generate check-generated test bench demo clean

all: build

build:
	@mkdir -p $(BIN)
	@set -e; for t in $(CMDS) $(PLUGINS); do \
		name=$${t%%:*}; pkg=$${t#*:}; \
		if [ -d "$$pkg" ]; then echo "go build -o $(BIN)/$$name $$pkg"; $(GO) build -o $(BIN)/$$name $$pkg; fi; \
	done

# Packages the tests and `make generate` need (clang, libbpf-dev, protoc,
# libxdp-dev, xdp-tools, ...), installed when missing; bpffs mounted.
deps:
	@.ci/install-deps

# Regenerate the committed bpf2go and protobuf output (needs clang, libbpf-dev, protoc).
generate: deps
	$(GO) generate ./dispatcher/ ./plugins/...

# CI: the committed generated code must be what `make generate` makes.
check-generated: generate
	@git diff --exit-code --stat -- dispatcher plugins || \
		{ echo "generated code is stale: run make generate and commit"; exit 1; }

# Every package's tests, one package at a time (the end-to-end tests and
# the cost checks want the machine's two cores to themselves). Privileged
# suites fail instead of skipping when CI is set; .ci/required-tests lists
# suites that must have run and passed.
test: deps build
	@mkdir -p $(BIN)
	@set -o pipefail; $(GO) test -count=1 -p 1 -v ./... 2>&1 | tee $(TESTLOG) | grep -E '^(=== RUN|--- |ok |FAIL|PASS|panic:)' | grep -v '^=== RUN'; \
		status=$$?; \
		.ci/check-test-log $(TESTLOG) || status=1; \
		exit $$status

# Benchmarks: kernel ns per packet beside the floor, and end-to-end
# requests/s through xlb beside a direct path, in the same run.
bench: build
	$(GO) test -run '^$$' -bench 'Datapath|Chain|Select|TrafficCounters' -benchtime 200000x -count 3 ./dispatcher/ | tee $(BIN)/bench-datapath.txt
	$(GO) test -run '^$$' -bench 'SweepIdle' -benchtime 20x -count 1 ./dispatcher/ | tee -a $(BIN)/bench-datapath.txt
	$(GO) test -run '^$$' -bench EndToEnd -benchtime 1x -count 1 ./cmd/xlbd/ | tee $(BIN)/bench-e2e.txt
	$(GO) test -run '^$$' -bench PolicySwap -benchtime 20x -count 1 ./cmd/xlbd/ | tee -a $(BIN)/bench-e2e.txt

demo: build
	./$(BIN)/xlb-demo

clean:
	rm -rf $(BIN)

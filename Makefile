# xlb: build, generate, test, benchmark, demo and install.
# `sudo make demo` and `sudo make test` are the README's two commands.
SHELL := /bin/bash
# A go new enough for go.mod, also where sudo's PATH does not reach
# (/usr/local/go/bin): scripts/find-go. `make GO=/path/to/go` overrides.
ifeq ($(origin GO),undefined)
GO := $(shell scripts/find-go 2>/dev/null || echo go)
endif
# Tests run `go` themselves: the same one.
ifneq ($(findstring /,$(GO)),)
export PATH := $(dir $(GO)):$(PATH)
endif
BIN   := bin
# Binaries and the packages they come from.
CMDS := xlbd:./cmd/xlbd xlbctl:./cmd/xlbctl xlb-demo:./cmd/xlb-demo
PLUGINS := xlb-policy-random:./plugins/random/cmd/xlb-policy-random \
	xlb-policy-hash:./plugins/hash/cmd/xlb-policy-hash \
	xlb-policy-least-conn:./plugins/leastconn/cmd/xlb-policy-least-conn
TESTLOG ?= $(BIN)/test.log

# Installed layout (make install PREFIX=... DESTDIR=...): xlbd finds its
# plugins in $(PLUGINDIR), which is ../lib/xlb/plugins from $(BINDIR).
PREFIX     ?= /usr/local
SYSCONFDIR ?= /etc
BINDIR     := $(PREFIX)/bin
PLUGINDIR  := $(PREFIX)/lib/xlb/plugins
UNITDIR    := $(PREFIX)/lib/systemd/system
DOCDIR     := $(PREFIX)/share/doc/xlb
DATADIR    := $(PREFIX)/share

.PHONY: all check-go deps build generate check-generated lint test fuzz fuzz-seeds bench demo install clean

all: build

check-go:
	@scripts/find-go --check "$(GO)"

# -buildvcs=auto: --version names the git revision (GOFLAGS may say false).
build: check-go
	@mkdir -p $(BIN)
	@set -e; for t in $(CMDS) $(PLUGINS); do \
		name=$${t%%:*}; pkg=$${t#*:}; \
		if [ -d "$$pkg" ]; then echo "go build -o $(BIN)/$$name $$pkg"; $(GO) build -buildvcs=auto -o $(BIN)/$$name $$pkg; fi; \
	done

# Binaries, plugins, the systemd unit, shell completion, docs and the
# Grafana dashboard; the configuration file only if there is none (an
# operator's file is never overwritten).
install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(PLUGINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR) \
		$(DESTDIR)$(SYSCONFDIR)/xlb $(DESTDIR)$(DATADIR)/bash-completion/completions \
		$(DESTDIR)$(DATADIR)/zsh/site-functions $(DESTDIR)$(DATADIR)/fish/vendor_completions.d
	install -m 0755 $(BIN)/xlbd $(BIN)/xlbctl $(DESTDIR)$(BINDIR)/
	@set -e; for t in $(PLUGINS); do \
		echo "install -m 0755 $(BIN)/$${t%%:*} $(DESTDIR)$(PLUGINDIR)/"; install -m 0755 $(BIN)/$${t%%:*} $(DESTDIR)$(PLUGINDIR)/; \
	done
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' \
		packaging/xlbd.service.in > $(DESTDIR)$(UNITDIR)/xlbd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/xlbd.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/xlb/xlb.yaml ]; then \
		echo "$(DESTDIR)$(SYSCONFDIR)/xlb/xlb.yaml exists: kept"; \
	else \
		echo "install -m 0644 packaging/xlb.yaml $(DESTDIR)$(SYSCONFDIR)/xlb/xlb.yaml"; \
		install -m 0644 packaging/xlb.yaml $(DESTDIR)$(SYSCONFDIR)/xlb/xlb.yaml; \
	fi
	$(BIN)/xlbctl completion bash > $(DESTDIR)$(DATADIR)/bash-completion/completions/xlbctl
	$(BIN)/xlbctl completion zsh > $(DESTDIR)$(DATADIR)/zsh/site-functions/_xlbctl
	$(BIN)/xlbctl completion fish > $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/xlbctl.fish
	install -m 0644 README.md docs/*.md docs/grafana-dashboard.json $(DESTDIR)$(DOCDIR)/

# Packages the tests and `make generate` need (clang, libbpf-dev, protoc,
# libxdp-dev, xdp-tools, ...), installed when missing; bpffs mounted.
deps:
	@.ci/install-deps

# Regenerate the committed bpf2go and protobuf output (needs clang, libbpf-dev,
# protoc): the data path, the policy plugin protocol and the control API.
generate: deps
	$(GO) generate ./dispatcher/ ./plugins/... ./internal/control/

# CI: the committed generated code must be what `make generate` makes.
check-generated: generate
	@git diff --exit-code --stat -- dispatcher plugins internal/control || \
		{ echo "generated code is stale: run make generate and commit"; exit 1; }

# First-party C: the pipeline and the tests' BPF objects (libbpf's vendored
# headers keep their own style).
CSRC = $(wildcard programs/*.c programs/include/xlb_*.h */testdata/*.c */*/testdata/*.c)

# Lint: gofmt, go vet, staticcheck (pinned as a tool in go.mod) and
# clang-format (.clang-format) for the BPF C.
lint: deps
	@out=$$($$($(GO) env GOROOT)/bin/gofmt -l .); if [ -n "$$out" ]; then echo "gofmt: not formatted:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	clang-format --dry-run --Werror $(CSRC)

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

# Fuzzing: FuzzPipeline (dispatcher/fuzz_test.go) runs arbitrary frames
# through the whole pipeline. FUZZTIME is go test's -fuzztime: a count of
# inputs (the default, 1,000,000; CI runs 10,000) or a duration. A count, not
# a duration: Go 1.26's fuzzing coordinator can fail a run that ends on
# its -fuzztime deadline with "context deadline exceeded" (golang/go#75804),
# which is what a CI run did. New inputs
# that widen coverage are minimised for at most a second (the default,
# a minute each, would stall the run). The time taken is printed at the end.
FUZZTIME ?= 1000000x
fuzz: deps
	@mkdir -p $(BIN)
	@start=$$(date +%s); \
		$(GO) test -run '^$$' -fuzz '^FuzzPipeline$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 1s -timeout 0 ./dispatcher/ >$(BIN)/fuzz.log 2>&1; \
		status=$$?; grep -v 'fuzz: elapsed' $(BIN)/fuzz.log | tail -n 20; grep 'fuzz: elapsed' $(BIN)/fuzz.log | tail -n 1; \
		echo "fuzz: -fuzztime $(FUZZTIME) took $$(( $$(date +%s) - start )) s (build included)"; exit $$status

# The fuzz seed corpus: the frames every test of the dispatcher package
# runs, recorded by the tests themselves (see recordFrame).
fuzz-seeds:
	rm -f dispatcher/testdata/fuzz/FuzzPipeline/seed-*
	XLB_FUZZ_SEEDS=$(CURDIR)/dispatcher/testdata/fuzz/FuzzPipeline $(GO) test -count=1 -run 'Test' -skip 'TestDatapathCostTargets' ./dispatcher/

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

# csi-composefs: build, test, fuzz, benchmark.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
BIN := bin/csi-composefs
# Each fuzz target runs a count of executions in `make test` (CI), given after a second colon
# (default FUZZCOUNT): a count, not a duration, because Go 1.26's fuzz coordinator can fail a
# duration-bounded run with "context deadline exceeded" at the deadline (go.dev/issue/75804).
# FUZZTIME, when set, replaces every target's budget: run longer by hand with
# `make fuzz FUZZTIME=10m`. Minimisation is capped: the seeds are whole images, and minimising
# one costs up to a minute. The attribute and secret parsers are cheap: 100000x each; the OCI
# parsers (object index, artifact manifests, layer tars) 30000x each (about 10 s each).
FUZZCOUNT ?= 300000x
FUZZTIME ?=
FUZZ_TARGETS := ./pkg/cfs:FuzzOpenImage ./pkg/cfs:FuzzParseDump ./pkg/fetch:FuzzParseContentRange \
	./pkg/driver:FuzzParseVolumeContext:100000x ./pkg/driver:FuzzParseSecrets:100000x \
	./pkg/cfs:FuzzParseMountInfo:50000x \
	./pkg/fetch/oci:FuzzDecodeIndex:30000x ./pkg/fetch/oci:FuzzDecodeArtifact:30000x ./pkg/fetch/oci:FuzzApplyLayer:30000x

.PHONY: all build deps test vet fmt-check unit fuzz bench demo clean

all: build

deps:
	@eval "$$(./hack/install-deps.sh)" && $(GO) version

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/csi-composefs

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

unit:
	$(GO) test -race -count=1 ./...

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; rest=$${t#*:}; fn=$${rest%%:*}; \
	  budget=$(FUZZCOUNT); [ "$$rest" = "$$fn" ] || budget=$${rest#*:}; [ -z "$(FUZZTIME)" ] || budget=$(FUZZTIME); \
	  echo "fuzz $$fn in $$pkg for $$budget"; \
	  $(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $$budget -fuzzminimizetime 50x $$pkg; done

# The test command of the README and of CI: installs what it needs, then
# checks formatting, vets, runs every test with the race detector, and fuzzes
# each parser of untrusted bytes for a bounded time.
test:
	@eval "$$(./hack/install-deps.sh)" && $(GO) version && $(MAKE) --no-print-directory fmt-check vet unit fuzz

bench:
	$(GO) test -run '^$$' -bench . -benchtime 3x ./pkg/cfs/

# The README's main job: build the tool and an image from a sample tree.
demo:
	./hack/demo.sh

clean:
	rm -rf bin _output

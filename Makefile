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
# one costs up to a minute. The driver's attribute and secret parsers run 30000x each (the
# driver package's instrumented test binary is slow per execution); the pack and OCI
# parsers (object and pack indexes, artifact manifests, layer tars) and the canonical-image check 30000x
# each (about 10 s each).
FUZZCOUNT ?= 300000x
FUZZTIME ?=
FUZZ_TARGETS := ./pkg/cfs:FuzzOpenImage ./pkg/cfs:FuzzParseDump ./pkg/fetch:FuzzParseContentRange:100000x \
	./pkg/driver:FuzzParseVolumeContext:30000x ./pkg/driver:FuzzParseSecrets:30000x \
	./pkg/cfs:FuzzParseMountInfo:50000x ./pkg/cfs:FuzzCheckSELinuxContext:100000x ./pkg/cfs:FuzzCheckCanonical:30000x \
	./pkg/fetch/pack:FuzzDecodeIndex:30000x ./pkg/fetch/pack:FuzzDecodeRepoIndex:30000x ./pkg/fetch/oci:FuzzDecodeArtifact:30000x ./pkg/fetch/oci:FuzzApplyLayer:30000x \
	./pkg/fetch:FuzzParseKept:30000x ./pkg/trust:FuzzParsePolicy:20000x ./pkg/trust:FuzzVerifyBlob:20000x ./pkg/trust:FuzzVerifyManifestSignature:10000x

# The plugin image (make image): built without a container engine by
# hack/image. The chart's default image.repository is IMAGE_REPO; set
# IMAGE_TAG to match the chart's image.tag when loading it into a cluster.
IMAGE_REPO ?= ghcr.io/csi-composefs/csi-composefs
IMAGE_TAG ?= $(VERSION)
IMAGE_PLATFORMS ?= linux/amd64 linux/arm64
IMAGE_OUT ?= _output/image
# Every file and the config carry this time: the commit's, so that the same
# commit gives the same image digest.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null)
# Modules of their own, tested by `make test` too.
SUBMODULES := hack/image test/deploy test/e2e/registry

.PHONY: all build deps test vet fmt-check unit fuzz bench bench-cfs c-tools demo e2e bench-e2e clean image image-check test-modules vm-test test-cosign

all: build

deps:
	@eval "$$(./hack/install-deps.sh)" && $(GO) version

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/csi-composefs

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...
	@set -e; for m in $(SUBMODULES); do echo "go vet in $$m"; (cd $$m && $(GO) vet ./...); done

unit:
	$(GO) test -race -count=1 ./...

# The image builder, the deployment tests (chart, kustomize base,
# manifests decoded strictly, DaemonSet arguments parsed by the binary's
# flag set) and the registry e2e (distribution in process: push, publish
# over gRPC with real mounts, the registry's GC) are modules of their own,
# so the product's go.mod stays lean.
test-modules:
	@set -e; for m in $(SUBMODULES); do echo "go test in $$m"; (cd $$m && $(GO) test -count=1 ./...); done

# Round trips with the real cosign CLI, built from its module by the test
# (test/cosign; about 4 CPU-minutes to build once, then cached). Not part of
# `make test`.
test-cosign:
	cd test/cosign && $(GO) test -count=1 ./...

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; rest=$${t#*:}; fn=$${rest%%:*}; \
	  budget=$(FUZZCOUNT); [ "$$rest" = "$$fn" ] || budget=$${rest#*:}; [ -z "$(FUZZTIME)" ] || budget=$(FUZZTIME); \
	  echo "fuzz $$fn in $$pkg for $$budget"; \
	  $(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $$budget -fuzzminimizetime 50x $$pkg; done

# The test command of the README and of CI: installs what it needs, then
# checks formatting, vets, runs every test with the race detector, and fuzzes
# each parser of untrusted bytes for a bounded time.
test:
	@eval "$$(./hack/install-deps.sh)" && $(GO) version && $(MAKE) --no-print-directory fmt-check vet unit test-modules fuzz

bench:
	$(GO) test -run '^$$' -bench . -benchtime 3x ./pkg/cfs/

# The reference C composefs tools, in a cache folder outside the repository
# (the differential tests install them on demand too).
c-tools:
	./hack/c-tools.sh

# Image tools against the C tools: ratios of medians, measured in one run.
bench-cfs:
	$(GO) run ./bench/cfsbench

# The README's main job: a pod with a composefs volume on the local
# cluster (./hack/demo.sh --tools-only: just the image tools).
demo:
	./hack/demo.sh

# The plugin image for IMAGE_PLATFORMS: static binaries (CGO_ENABLED=0), then
# IMAGE_OUT/oci (OCI image layout, multi-arch index), one docker-save
# tarball per platform (ctr -n k8s.io images import, docker load) and
# IMAGE_OUT/digest (the index digest).
image:
	@eval "$$(./hack/install-deps.sh)" && set -e; bins=; \
	for p in $(IMAGE_PLATFORMS); do os=$${p%/*}; arch=$${p#*/}; out=_output/bin/$$os-$$arch/csi-composefs; \
	  echo "go build $$p"; \
	  CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch $(GO) build -trimpath -buildvcs=false -ldflags "-s -w $(LDFLAGS)" -o $$out ./cmd/csi-composefs; \
	  bins="$$bins -binary $$p=$(CURDIR)/$$out"; done; \
	cd hack/image && SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(GO) run . -ref $(IMAGE_REPO):$(IMAGE_TAG) \
	  -version $(VERSION) -revision "$(REVISION)" -out $(CURDIR)/$(IMAGE_OUT) $$bins

# Reproducibility: build the image twice, the second time with an empty
# build cache (nothing reused), and compare the digests. The version is
# fixed once, so that a file edited meanwhile cannot change it.
image-check:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(MAKE) --no-print-directory image IMAGE_OUT=_output/image-a VERSION=$(VERSION) IMAGE_TAG=$(IMAGE_TAG); \
	GOCACHE=$$tmp $(MAKE) --no-print-directory image IMAGE_OUT=_output/image-b VERSION=$(VERSION) IMAGE_TAG=$(IMAGE_TAG); \
	a=$$(cat _output/image-a/digest); b=$$(cat _output/image-b/digest); \
	if [ "$$a" = "$$b" ]; then echo "reproducible: $$a"; else echo "digests differ: $$a $$b"; exit 1; fi

# The end-to-end suite on a local single-node cluster built from parts
# (test/e2e/cluster): up, install the chart, the suite, down. Needs root.
e2e:
	./hack/e2e.sh

# The startup benchmark on the local cluster (bench/README.md): pod start
# with a ~200 MiB composefs volume cold and warm vs an emptyDir filled from
# a tarball, one run.
bench-e2e:
	E2E_BENCH=1 E2E_RUN=TestBenchStartup ./hack/e2e.sh

# The QEMU tests (test/e2e/vm) on Debian's 6.12 kernel with fs-verity:
# TestVMVerity (about 1 minute; `make test` runs it too) and the power-cut
# test (20 cuts, about 3 minutes; only here). hack/vm-deps.sh fetches the
# kernel and QEMU the first time. POWERCUT_SEED replays a power-cut run.
vm-test:
	CSI_COMPOSEFS_VM_POWERCUT=1 $(if $(POWERCUT_SEED),CSI_COMPOSEFS_POWERCUT_SEED=$(POWERCUT_SEED)) \
	  $(GO) test -count=1 -v -timeout 40m -run '^TestVM' ./test/e2e/vm/

clean:
	rm -rf bin _output

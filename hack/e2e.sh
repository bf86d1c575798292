#!/usr/bin/env bash
# make e2e: the end-to-end suite on a local single-node cluster built from
# parts on this machine (test/e2e/cluster): bring it up, install the driver
# with the Helm chart from the image `make image` builds, run the suite,
# bring it down (also on failure or interrupt). Needs root.
# The Kubernetes binaries are built once (about 8 minutes on 2 cores) and
# cached under ${XDG_CACHE_HOME:-$HOME/.cache}/csi-composefs/.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./hack/install-deps.sh)"
test/e2e/cluster/install-deps.sh

export E2E_WORK=${E2E_WORK:-/var/tmp/csi-composefs-e2e}
export E2E_REPO_ADDR=${E2E_REPO_ADDR:-127.0.0.1:18080}
export E2E_REGISTRY_ADDR=${E2E_REGISTRY_ADDR:-127.0.0.1:18443}
harness=$PWD/bin/e2e-cluster
t0=$(date +%s)
stamp() { echo "e2e: $1 at +$(( $(date +%s) - t0 ))s"; }

make --no-print-directory build image IMAGE_PLATFORMS=linux/"$(go env GOARCH)"
(cd test/e2e/cluster && go build -o "$harness" ./cmd/e2e-cluster &&
	CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$PWD/../../../bin/e2e-pause" ./cmd/pause)
# The harness's and the kind config's own checks (vet, unit tests: wrapper
# go.mod, cache check, image layers; kind config decoded strictly).
for m in test/e2e/cluster test/e2e/kind; do (cd "$m" && go vet ./... && go test -count=1 ./...); done
stamp "tools built"
"$harness" build
stamp "kubernetes binaries ready"

on_exit() {
	rc=$?
	if [ "$rc" -ne 0 ] && [ -d "$E2E_WORK/log" ]; then
		for f in "$E2E_WORK"/log/*.log; do echo "----- last lines of $f"; tail -n 25 "$f"; done
	fi
	"$harness" down || rc=1
	stamp "down"
	exit "$rc"
}
trap on_exit EXIT
"$harness" up --pause-bin bin/e2e-pause
stamp "cluster up"
plugin=$(ls -t _output/image/*-linux-"$(go env GOARCH)".tar 2>/dev/null | head -n1)
[ -n "$plugin" ] || { echo "e2e: no docker-save tarball of the plugin image under _output/image" >&2; exit 1; }
"$harness" install --chart charts/csi-composefs --image "$plugin" \
	--set "allowedSources={http://$E2E_REPO_ADDR/e2e/,oci://$E2E_REGISTRY_ADDR/e2e/,docker://$E2E_REGISTRY_ADDR/e2e/}"
stamp "driver installed"
E2E=1 E2E_CLI=$PWD/bin/csi-composefs go -C test/e2e/cluster test -count=1 -v -timeout 60m -run "${E2E_RUN:-.}" ./suite
stamp "suite done"

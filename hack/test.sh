#!/usr/bin/env bash
# The README's test command and what CI runs: installs what is missing, then
# `make test` (gofmt, go vet, go test -race ./..., bounded fuzzing), then the
# end-to-end suite on a local single-node cluster (hack/e2e.sh, needs root).
# E2E=0 skips the end-to-end suite.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./hack/install-deps.sh)"
make test
if [ "${E2E:-1}" = 0 ]; then
	echo "E2E=0: the end-to-end suite is skipped"
	exit 0
fi
exec ./hack/e2e.sh

#!/usr/bin/env bash
# The README's test command and what CI runs: installs what is missing, then
# `make test` (gofmt, go vet, go test -race ./..., bounded fuzzing).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./hack/install-deps.sh)"
exec make test

#!/usr/bin/env bash
# Installs what building and testing csi-composefs needs on a Debian machine:
# Go (>= 1.26) and the few system tools the tests use. Safe to run again.
set -euo pipefail

want_go=1.26
need_apt=()
command -v mkfs.ext4 >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need_apt+=(util-linux)
command -v git >/dev/null 2>&1 || need_apt+=(git)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev) # go test -race needs cgo

go_ok() {
	command -v go >/dev/null 2>&1 || return 1
	local v
	v=$(go env GOVERSION 2>/dev/null | sed 's/^go//')
	[ "$(printf '%s\n%s\n' "$want_go" "$v" | sort -V | head -n1)" = "$want_go" ]
}

if [ -x /usr/local/go/bin/go ] && ! command -v go >/dev/null 2>&1; then
	export PATH=/usr/local/go/bin:$PATH
fi
if ! go_ok && ! command -v go >/dev/null 2>&1; then
	need_apt+=(golang-go)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
	SUDO=""
	[ "$(id -u)" -eq 0 ] || SUDO=sudo
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! go_ok; then
	# An older distribution Go fetches the toolchain go.mod asks for from the
	# module proxy (Go >= 1.21 understands GOTOOLCHAIN).
	echo "install-deps: Go $(go env GOVERSION 2>/dev/null) is older than $want_go; using GOTOOLCHAIN=go${want_go}.0+auto" >&2
	echo "export GOTOOLCHAIN=go${want_go}.0+auto"
fi

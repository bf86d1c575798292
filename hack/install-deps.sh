#!/usr/bin/env bash
# Installs what building and testing csi-composefs needs on a Debian machine:
# Go (>= 1.26) and the few system tools the tests use. Safe to run again.
# Prints shell lines to eval (PATH for a Go it installed): eval "$(hack/install-deps.sh)"
set -euo pipefail

want_go=1.26
bootstrap_go_version=go1.26.8 # fetched from the Go module proxy when no Go >= $want_go is present

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

need_apt=()
command -v mkfs.ext4 >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need_apt+=(util-linux)
command -v git >/dev/null 2>&1 || need_apt+=(git)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v unzip >/dev/null 2>&1 || need_apt+=(unzip)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev) # go test -race needs cgo

bootstrap_dir=/usr/local/lib/csi-composefs-go/$bootstrap_go_version
for d in /usr/local/go/bin "$bootstrap_dir/bin"; do
	if [ -x "$d/go" ] && ! command -v go >/dev/null 2>&1; then
		export PATH="$d:$PATH"
	fi
done

go_ok() {
	command -v go >/dev/null 2>&1 || return 1
	local v
	v=$(GOTOOLCHAIN=local go env GOVERSION 2>/dev/null | sed 's/^go//')
	[ -n "$v" ] && [ "$(printf '%s\n%s\n' "$want_go" "$v" | sort -V | head -n1)" = "$want_go" ]
}

# The distribution's Go is only a way to learn the configured module proxy.
go_ok || command -v go >/dev/null 2>&1 || need_apt+=(golang-go)

if [ ${#need_apt[@]} -gt 0 ]; then
	$SUDO apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >&2
fi

if ! go_ok; then
	# Fetch the official toolchain module from the configured Go module proxy
	# (what GOTOOLCHAIN does, for distributions whose Go predates it).
	case "$(uname -m)" in
	x86_64) arch=amd64 ;;
	aarch64) arch=arm64 ;;
	*) echo "install-deps: unsupported architecture $(uname -m)" >&2; exit 1 ;;
	esac
	proxy=$(go env GOPROXY | tr ',|' '\n\n' | grep -Ev '^(direct|off)$' | head -n1)
	if [ -z "$proxy" ]; then
		echo "install-deps: no Go module proxy configured (go env GOPROXY)" >&2
		exit 1
	fi
	if [ ! -x "$bootstrap_dir/bin/go" ]; then
		echo "install-deps: installing $bootstrap_go_version from the Go module proxy into $bootstrap_dir" >&2
		tmp=$(mktemp -d)
		trap 'rm -rf "$tmp"' EXIT
		mod="v0.0.1-$bootstrap_go_version.linux-$arch"
		curl -fsSL "$proxy/golang.org/toolchain/@v/$mod.zip" -o "$tmp/toolchain.zip"
		unzip -q "$tmp/toolchain.zip" -d "$tmp"
		chmod +x "$tmp/golang.org/toolchain@$mod"/bin/* "$tmp/golang.org/toolchain@$mod"/pkg/tool/*/*
		$SUDO mkdir -p "$(dirname "$bootstrap_dir")"
		$SUDO mv "$tmp/golang.org/toolchain@$mod" "$bootstrap_dir"
	fi
	export PATH="$bootstrap_dir/bin:$PATH"
	go_ok || { echo "install-deps: $bootstrap_dir/bin/go does not work" >&2; exit 1; }
fi
echo "export PATH=\"$(dirname "$(command -v go)"):\$PATH\""

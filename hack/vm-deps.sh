#!/usr/bin/env bash
# Fetches what the QEMU tests of test/e2e/vm need, without changing the
# system's apt sources: Debian's 6.12 kernel (linux-image-amd64 from trixie:
# fs-verity built in, ext4/erofs/overlay as modules) and busybox-static,
# downloaded through a private apt folder and unpacked into a cache folder;
# and qemu-system-x86 (the distribution's own, installed with apt-get when
# missing). Safe to run again: what is there is reused.
#
# Prints shell-style lines the tests read:
#   KERNEL=…/vmlinuz-…   MODULES=…/lib/modules/VERSION   BUSYBOX=…/busybox   QEMU=…/qemu-system-x86_64
# Exit status 3 means "cannot be had here" (no apt, the archive unreachable,
# the package unknown): the tests then skip, saying why.
set -euo pipefail

cache=${CSI_COMPOSEFS_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/csi-composefs/vm}
suite=${CSI_COMPOSEFS_VM_SUITE:-trixie}
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # one fetch at a time; concurrent test runs share the result

unavailable() {
	echo "vm-deps: $*" >&2
	exit 3
}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

qemu=$(command -v qemu-system-x86_64 || true)
if [ -z "$qemu" ]; then
	command -v apt-get >/dev/null 2>&1 || unavailable "no qemu-system-x86_64 and no apt-get to install it"
	if [ -n "$SUDO" ] && ! sudo -n true 2>/dev/null; then
		unavailable "no qemu-system-x86_64, and installing qemu-system-x86 needs root"
	fi
	echo "vm-deps: installing qemu-system-x86 (the distribution's)" >&2
	if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2; then
		$SUDO apt-get update -qq >&2 || true
		DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2 ||
			unavailable "apt-get cannot install qemu-system-x86"
	fi
	qemu=$(command -v qemu-system-x86_64) || unavailable "qemu-system-x86 installed no qemu-system-x86_64"
fi

if ! command -v xz >/dev/null 2>&1; then # the kernel's modules are .ko.xz
	command -v apt-get >/dev/null 2>&1 || unavailable "no xz to decompress kernel modules"
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends xz-utils >&2 ||
		unavailable "apt-get cannot install xz-utils"
fi

ready=$cache/ready.$suite
if [ -s "$ready" ]; then
	# shellcheck disable=SC1090
	. "$ready"
	if [ -f "$KERNEL" ] && [ -d "$MODULES" ] && [ -x "$BUSYBOX" ]; then
		cat "$ready"
		echo "QEMU=$qemu"
		exit 0
	fi
fi

command -v apt-get >/dev/null 2>&1 || unavailable "no apt-get to download Debian's kernel"
command -v dpkg-deb >/dev/null 2>&1 || unavailable "no dpkg-deb to unpack Debian's kernel"
# The machine's own Debian archive, read from its apt configuration.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
	[ -f "$f" ] || continue
	mirror=$(awk '/^URIs:/ {print $2; exit}' "$f")
	[ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
	mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || unavailable "no Debian archive in the machine's apt configuration"

apt=$cache/apt
mkdir -p "$apt/lists/partial" "$apt/parts" "$apt/cache/archives/partial"
cat >"$apt/parts/$suite.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
o=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt/parts" -o "Dir::State::Lists=$apt/lists"
	-o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
echo "vm-deps: reading $suite's package lists into $apt" >&2
apt-get "${o[@]}" -qq update >&2 || unavailable "apt-get update of $suite failed"
pkg=$(apt-cache "${o[@]}" depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || unavailable "linux-image-amd64 of $suite names no kernel package"

debs=$cache/debs
mkdir -p "$debs"
echo "vm-deps: downloading $pkg and busybox-static" >&2
(cd "$debs" && apt-get "${o[@]}" -qq download "$pkg" busybox-static >&2) || unavailable "downloading $pkg failed"
kdeb=$(ls -t "$debs/${pkg}_"*.deb | head -n1)
bdeb=$(ls -t "$debs"/busybox-static_*.deb | head -n1)

root=$cache/root.$suite
rm -rf "$root.new"
mkdir -p "$root.new"
# Only the kernel and the module folders the tests can need (about 25 MB
# of the package's 500).
dpkg-deb --fsys-tarfile "$kdeb" | tar -x -C "$root.new" --wildcards \
	'./boot/vmlinuz-*' './usr/lib/modules/*/kernel/fs/*' './usr/lib/modules/*/kernel/lib/*' \
	'./usr/lib/modules/*/kernel/crypto/*' './usr/lib/modules/*/kernel/arch/x86/crypto/*' \
	'./usr/lib/modules/*/kernel/drivers/block/*' './usr/lib/modules/*/modules.builtin'
dpkg-deb --fsys-tarfile "$bdeb" | tar -x -C "$root.new" ./usr/bin/busybox
rm -rf "$root"
mv "$root.new" "$root"
kernel=$(ls "$root"/boot/vmlinuz-* | head -n1)
modules=$(ls -d "$root"/usr/lib/modules/* | head -n1)
rm -f "$kdeb" # unpacked; 100 MB less in the cache
{
	echo "KERNEL=$kernel"
	echo "MODULES=$modules"
	echo "BUSYBOX=$root/usr/bin/busybox"
} >"$ready.new"
mv "$ready.new" "$ready"
cat "$ready"
echo "QEMU=$qemu"

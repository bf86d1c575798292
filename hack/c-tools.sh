#!/usr/bin/env bash
# Installs the reference C composefs tools (mkcomposefs, composefs-info,
# mount.composefs 1.0.8) and fsck.erofs from Debian unstable into a private
# folder outside the repository, for the differential tests and the
# benchmarks. Nothing is installed into the system and the system's apt
# sources are not changed: a private apt state folder lists Debian unstable
# from the machine's own archive, the packages are only downloaded and
# unpacked, and the binaries run with unstable's dynamic loader (they need a
# newer glibc than Debian 12 has).
#
# Prints the folder of the wrappers (bin/mkcomposefs, bin/composefs-info,
# bin/mount.composefs, bin/fsck.erofs) on standard output; exits 2 when the
# packages cannot be fetched (no archive, no network), 1 on other errors.
# Safe to run concurrently and again: a complete install is reused.
#
#   CFS_C_TOOLS_DIR   where to install (default: ~/.cache/csi-composefs/c-tools)
set -euo pipefail

D=${CFS_C_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/csi-composefs/c-tools}
BIN=$D/bin
packages=(composefs libcomposefs1 libc6 libssl3t64 libzstd1 zlib1g
	erofs-utils liblz4-1 libdeflate0 liblzma5 libuuid1 libselinux1 libpcre2-8-0)

ready() {
	[ -x "$BIN/mkcomposefs" ] && [ -x "$BIN/composefs-info" ] && [ -x "$BIN/mount.composefs" ] &&
		printf '/ 0 40755 2 0 0 0 0.0 - - -\n' | "$BIN/mkcomposefs" --from-file --print-digest-only - >/dev/null 2>&1
}

if ready; then
	echo "$BIN"
	exit 0
fi

mkdir -p "$D"
exec 9>"$D/.lock"
flock 9
if ready; then
	echo "$BIN"
	exit 0
fi

sources=/etc/apt/sources.list.d/debian.sources
mirror=""
if [ -r "$sources" ]; then
	mirror=$(awk '/^URIs:/ {print $2; exit}' "$sources")
fi
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
	mirror=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)
fi
if [ -z "$mirror" ]; then
	echo "c-tools: no Debian archive configured in $sources or /etc/apt/sources.list" >&2
	exit 2
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
	echo "c-tools: apt-get and dpkg are needed (Debian or Ubuntu)" >&2
	exit 2
fi
case "$(uname -m)" in
x86_64) triplet=x86_64-linux-gnu loader=ld-linux-x86-64.so.2 ;;
aarch64) triplet=aarch64-linux-gnu loader=ld-linux-aarch64.so.1 ;;
*) echo "c-tools: unsupported architecture $(uname -m)" >&2; exit 2 ;;
esac

rm -rf "$D/apt" "$D/debs" "$D/root" "$BIN"
mkdir -p "$D/apt/lists/partial" "$D/apt/parts" "$D/apt/cache/archives/partial" "$D/debs"
cat >"$D/apt/parts/sid.sources" <<EOF
Types: deb
URIs: $mirror
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
o=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$D/apt/parts"
	-o "Dir::State::Lists=$D/apt/lists" -o "Dir::Cache=$D/apt/cache"
	-o "Dir::State::status=/dev/null" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
echo "c-tools: fetching the Debian unstable package lists into $D/apt" >&2
if ! apt-get "${o[@]}" -qq update >&2; then
	echo "c-tools: cannot fetch the Debian unstable package lists" >&2
	exit 2
fi
echo "c-tools: downloading ${packages[*]}" >&2
if ! (cd "$D/debs" && apt-get "${o[@]}" -qq download "${packages[@]}" >&2); then
	echo "c-tools: cannot download the packages" >&2
	exit 2
fi
for f in "$D"/debs/*.deb; do dpkg -x "$f" "$D/root"; done

L=$D/root/usr/lib/$triplet
mkdir -p "$BIN"
wrap() { # name path-in-root
	cat >"$BIN/$1" <<EOF
#!/bin/sh
exec "$L/$loader" --library-path "$L" "$D/root$2" "\$@"
EOF
	chmod +x "$BIN/$1"
}
wrap mkcomposefs /usr/bin/mkcomposefs
wrap composefs-info /usr/bin/composefs-info
wrap mount.composefs /usr/sbin/mount.composefs
[ -x "$D/root/usr/sbin/mount.composefs" ] || wrap mount.composefs /usr/bin/mount.composefs
wrap fsck.erofs /usr/bin/fsck.erofs
[ -x "$D/root/usr/bin/fsck.erofs" ] || wrap fsck.erofs /usr/sbin/fsck.erofs
rm -rf "$D/apt/lists" "$D/apt/cache" "$D/debs" # the unpacked tree is all that is needed
if ! ready; then
	echo "c-tools: the unpacked mkcomposefs does not run" >&2
	exit 1
fi
echo "c-tools: installed into $D" >&2
echo "$BIN"

#!/usr/bin/env bash
# The README's main job: build the tool, then turn a small sample directory
# into a composefs image plus its object store, and show what is inside.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./hack/install-deps.sh)"
make --no-print-directory build

out=_output/demo
rm -rf "$out"
mkdir -p "$out/tree/etc" "$out/tree/usr/share/doc"
printf 'hello from composefs\n' > "$out/tree/etc/motd"
seq 1 2000 > "$out/tree/usr/share/doc/numbers.txt"          # large enough to become an object
cp "$out/tree/usr/share/doc/numbers.txt" "$out/tree/etc/copy-of-numbers"  # stored once
ln -sf ../etc/motd "$out/tree/usr/motd"

set -x
bin/csi-composefs image build --digest-store "$out/objects" --print-digest "$out/tree" "$out/demo.cfs"
bin/csi-composefs image ls "$out/demo.cfs"
bin/csi-composefs image objects "$out/demo.cfs"
find "$out/objects" -type f

#!/usr/bin/env bash
# The e2e suite on a kind cluster, for users with Docker and kind. What
# differs from the local cluster of `make e2e`: kind makes the cluster, the
# images are loaded with `kind load image-archive`, the store is an ext4
# file system with fs-verity, and the test repository listens on the kind
# network's gateway, which the node reaches. Needs root (mkfs, mount).
# Remove with: kind delete cluster --name csi-composefs-e2e; umount /var/tmp/csi-composefs-kind/store
set -euo pipefail
cd "$(dirname "$0")/../../.."
name=csi-composefs-e2e
dir=/var/tmp/csi-composefs-kind

mkdir -p "$dir/store"
if ! mountpoint -q "$dir/store"; then
	[ -f "$dir/store.img" ] || { truncate -s 4G "$dir/store.img" && mkfs.ext4 -q -O verity "$dir/store.img"; }
	mount -o loop "$dir/store.img" "$dir/store"
fi
kind get clusters | grep -qx "$name" || kind create cluster --config test/e2e/kind/kind-config.yaml
export KUBECONFIG="$dir/kubeconfig"
kind get kubeconfig --name "$name" > "$KUBECONFIG"

make image
plugin=$(ls _output/image/*amd64*.tar | head -n1)
harness="go -C test/e2e/cluster run ./cmd/e2e-cluster"
$harness images --out "$dir"
kind load image-archive --name "$name" "$plugin"
kind load image-archive --name "$name" "$dir/busybox.tar"

gw=$(docker network inspect kind -f '{{range .IPAM.Config}}{{if .Gateway}}{{.Gateway}} {{end}}{{end}}' | tr ' ' '\n' | grep -m1 '\.')
export E2E=1 E2E_REPO_ADDR="$gw:18080" E2E_CLI="$PWD/bin/csi-composefs"
make build
$harness install --local=false --chart "$PWD/charts/csi-composefs" --image "$PWD/$plugin" \
	--set "allowedSources={http://$E2E_REPO_ADDR/e2e/}" --set image.pullPolicy=Never
go -C test/e2e/cluster test -count=1 -v -timeout 60m ./suite

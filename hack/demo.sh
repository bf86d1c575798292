#!/usr/bin/env bash
# The README's main job. By default: bring up the local single-node
# Kubernetes cluster (test/e2e/cluster; needs root, builds the Kubernetes
# binaries once, about 8 minutes on 2 cores), install the driver with its
# Helm chart from the image `make image` builds, publish a small sample tree
# as a composefs image in an HTTP repository on loopback, start a pod with a
# composefs volume of it, and show what the pod reads and how long it took
# to start. The cluster stays up; the last lines say how to tear it down.
#
#   ./hack/demo.sh --tools-only   the quick image-tools demo: build an image
#                                 and its object store from a sample tree
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./hack/install-deps.sh)"

tools_demo() {
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
}

if [ "${1:-}" = "--tools-only" ]; then
	tools_demo
	exit 0
fi
if [ $# -gt 0 ]; then
	echo "usage: $0 [--tools-only]" >&2
	exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "demo: the local cluster needs root (or run ./hack/demo.sh --tools-only)" >&2
	exit 1
fi
test/e2e/cluster/install-deps.sh
export E2E_WORK=${E2E_WORK:-/var/tmp/csi-composefs-e2e}
addr=127.0.0.1:18080
harness=$PWD/bin/e2e-cluster
make --no-print-directory build image IMAGE_PLATFORMS=linux/"$(go env GOARCH)"
(cd test/e2e/cluster && go build -o "$harness" ./cmd/e2e-cluster &&
	CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$PWD/../../../bin/e2e-pause" ./cmd/pause)
"$harness" up --pause-bin bin/e2e-pause
plugin=$(ls -t _output/image/*-linux-"$(go env GOARCH)".tar | head -n1)
"$harness" install --chart charts/csi-composefs --image "$plugin" --set "allowedSources={http://$addr/demo/}"
eval "$("$harness" env)"

# A sample tree published into an HTTP repository served on loopback.
out=$E2E_WORK/demo
rm -rf "$out"
mkdir -p "$out/tree/etc" "$out/tree/usr/share/doc" "$out/www/demo"
printf 'hello from composefs\n' > "$out/tree/etc/motd"
seq 1 20000 > "$out/tree/usr/share/doc/numbers.txt"
cp "$out/tree/usr/share/doc/numbers.txt" "$out/tree/etc/copy-of-numbers"
digest=$(bin/csi-composefs image build --repo "$out/www/demo" --name sample.cfs "$out/tree")
"$harness" serve --dir "$out/www" --listen "$addr"

set -x
cat <<YAML | kubectl apply -f -
apiVersion: v1
kind: Pod
metadata:
  name: composefs-demo
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
    - name: reader
      image: e2e.local/busybox:1
      imagePullPolicy: IfNotPresent
      command: ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
      volumeMounts:
        - {name: app, mountPath: /app, readOnly: true}
  volumes:
    - name: app
      csi:
        driver: composefs.csi.dev
        readOnly: true
        volumeAttributes:
          repository: http://$addr/demo
          image: sample.cfs
          digest: $digest
YAML
{ set +x; } 2>/dev/null
t0=$(date +%s.%N)
kubectl wait --for=condition=Ready pod/composefs-demo --timeout=180s
t1=$(date +%s.%N)
set -x
kubectl exec composefs-demo -- cat /app/etc/motd
kubectl exec composefs-demo -- sh -c 'wc -l /app/usr/share/doc/numbers.txt; grep " /app " /proc/mounts'
kubectl exec composefs-demo -- touch /app/x || true
{ set +x; } 2>/dev/null
echo
echo "The pod was Ready $(echo "$t1 - $t0" | awk '{printf "%.1f", $1 - $3}') s after kubectl apply (image $digest)."
echo "The cluster is still up. Use it with:  eval \"\$($harness env)\""
echo "Tear it down with:  $harness down"

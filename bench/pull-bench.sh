#!/usr/bin/env bash
# Benchmark of `csi-composefs pull` against one real static web server
# (nginx, on loopback) serving a repository of a ~1 GiB tree of ~10,000 files
# of mixed sizes. Prints ratios measured in this run:
#   cold pull ÷ curl of the same bytes as one file        (goal ≤ 1.25)
#   cold pull ÷ curl | tar xz of the same tree             (goal ≤ 0.5)
#   pull of a 2nd image sharing 90 % of the files:
#     bytes transferred ÷ (bytes of its new files + image)  (goal ≤ 1.05)
#   peak RSS of the pull
# Run by hand (not in CI), as root on Debian: installs nginx when missing,
# works in a temporary directory, listens on 127.0.0.1 only, cleans up.
# Environment: FILES (10000), TOTAL_MIB (1024), PARALLEL (16), KEEP=1 keeps
# the temporary directory, CSI_COMPOSEFS=path uses a prebuilt binary.
set -euo pipefail

FILES=${FILES:-10000}
TOTAL_MIB=${TOTAL_MIB:-1024}
PARALLEL=${PARALLEL:-16}
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$PATH:/usr/local/go/bin"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx && [ ! -x /usr/sbin/nginx ]; then
	echo "installing nginx…" >&2
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
	# Do not leave the distribution's server running on port 80.
	(systemctl stop nginx || service nginx stop || true) >/dev/null 2>&1
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
for t in curl tar gzip python3; do need "$t" || { echo "missing $t" >&2; exit 1; }; done
[ -x /usr/bin/time ] || { apt-get install -y -qq time >/dev/null; }

T=$(mktemp -d "${TMPDIR:-/var/tmp}/cfs-bench.XXXXXX")
chmod 755 "$T"
cleanup() {
	if [ -f "$T/nginx.pid" ]; then kill "$(cat "$T/nginx.pid")" 2>/dev/null || true; sleep 0.5; fi
	if [ "${KEEP:-0}" = 1 ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT

BIN=${CSI_COMPOSEFS:-}
if [ -z "$BIN" ]; then
	echo "building csi-composefs…" >&2
	(cd "$here" && go build -o "$T/csi-composefs" ./cmd/csi-composefs)
	BIN=$T/csi-composefs
fi

echo "generating ${FILES} files, ${TOTAL_MIB} MiB…" >&2
python3 - "$T/src" "$FILES" "$TOTAL_MIB" <<'EOF'
import math, os, random, sys, base64
root, n, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
rnd = random.Random(42)
sizes = [math.exp(rnd.uniform(math.log(100), math.log(4 << 20))) for _ in range(n)]
scale = total / sum(sizes)
sizes = [max(65, int(s * scale)) for s in sizes]
for i, size in enumerate(sizes):
    d = os.path.join(root, "d%02d" % (i % 64), "e%d" % (i % 7))
    os.makedirs(d, exist_ok=True)
    # Half incompressible (binaries, media), half text-like (compresses ~4:1).
    if i % 2:
        data = os.urandom(size)
    else:
        data = base64.b64encode(os.urandom(size))[:size]
        data = data.replace(b"A", b"\n").replace(b"B", b" ")[:size]
    with open(os.path.join(d, "f%05d" % i), "wb") as f:
        f.write(data)
EOF

www=$T/www
mkdir -p "$www/images"
echo "building the repository and the baselines…" >&2
"$BIN" image build --digest-store "$www/objects" "$T/src" "$www/images/app-1.cfs" >/dev/null
find "$T/src" -type f -print0 | sort -z | xargs -0 cat >"$www/blob"
tar -C "$T/src" -czf "$www/tree.tar.gz" .
chmod -R a+rX "$www"
tree_bytes=$(find "$T/src" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$T/nginx.conf" <<EOF
worker_processes 2;
pid $T/nginx.pid;
error_log $T/nginx-error.log;
events { worker_connections 1024; }
http {
	default_type application/octet-stream;
	log_format bench '\$request_uri \$status \$bytes_sent';
	access_log $T/access.log bench;
	sendfile on;
	tcp_nopush on;
	keepalive_requests 100000;
	keepalive_timeout 65;
	client_body_temp_path $T/nginx-tmp;
	proxy_temp_path $T/nginx-tmp;
	fastcgi_temp_path $T/nginx-tmp;
	uwsgi_temp_path $T/nginx-tmp;
	scgi_temp_path $T/nginx-tmp;
	server {
		listen 127.0.0.1:$port;
		root $www;
	}
}
EOF
mkdir -p "$T/nginx-tmp"
"$NGINX" -c "$T/nginx.conf" -p "$T" -g 'user root;' 2>/dev/null || "$NGINX" -c "$T/nginx.conf" -p "$T"
base=http://127.0.0.1:$port
for _ in $(seq 50); do curl -sf -o /dev/null "$base/images/app-1.cfs" && break; sleep 0.1; done

# Everything served from the page cache in every run.
cat "$www/blob" "$www/tree.tar.gz" >/dev/null
find "$www/objects" "$www/images" -type f -print0 | xargs -0 cat >/dev/null

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }

sync
t0=$(now); curl -sf -o "$T/blob.out" "$base/blob"; t1=$(now)
t_curl=$(elapsed "$t0" "$t1")
t0=$(now); sync "$T/blob.out"; t1=$(now)
t_fsync=$(elapsed "$t0" "$t1"); sync

# What creating one file costs on this filesystem (a pull creates one per
# object, like tar; curl creates one in all).
t_create=$(python3 - "$T" <<'EOF2'
import os, sys, time
d = os.path.join(sys.argv[1], "createprobe"); os.mkdir(d)
t = time.time()
for i in range(2000):
    os.close(os.open(f"{d}/f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
print(f"{(time.time() - t) / 2000 * 1e6:.0f}")
EOF2
)
# Not removed until the end: on ext4 without a journal, creating an inode
# scans past inodes deleted in the last minute, so deleting the baselines'
# files right before the pull would make the pull pay for them.

mkdir -p "$T/extract"
t0=$(now); curl -sf "$base/tree.tar.gz" | tar -xzf - -C "$T/extract"; t1=$(now)
t_tar=$(elapsed "$t0" "$t1"); sync

t0=$(now)
/usr/bin/time -f '%M' -o "$T/rss" "$BIN" pull --store-dir "$T/store" --repository "$base" \
	--fetch-concurrency "$PARALLEL" --progress none app-1.cfs >/dev/null
t1=$(now)
t_pull=$(elapsed "$t0" "$t1")
rss_kib=$(tail -1 "$T/rss")

# A second version: 10 % of the files get new content.
python3 - "$T/src" <<'EOF'
import os, random, sys
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(sys.argv[1]) for f in fs)
rnd = random.Random(7)
changed = rnd.sample(files, len(files) // 10)
total = 0
for p in changed:
    size = os.path.getsize(p)
    with open(p, "wb") as f:
        f.write(os.urandom(size))
    total += size
open(os.path.join(os.path.dirname(sys.argv[1]), "new-bytes"), "w").write(str(total))
EOF
"$BIN" image build --digest-store "$www/objects" "$T/src" "$www/images/app-2.cfs" >/dev/null
chmod -R a+rX "$www"
new_bytes=$(cat "$T/new-bytes")
img2=$(stat -c %s "$www/images/app-2.cfs")
: >"$T/access.log"; kill -USR1 "$(cat "$T/nginx.pid")"; sleep 0.3
t0=$(now)
"$BIN" pull --store-dir "$T/store" --repository "$base" --fetch-concurrency "$PARALLEL" --progress none app-2.cfs >/dev/null
t1=$(now)
t_pull2=$(elapsed "$t0" "$t1")
sleep 0.3
sent=$(awk '{s+=$3} END {print s+0}' "$T/access.log")
reqs=$(wc -l <"$T/access.log")

"$BIN" store verify --store-dir "$T/store" >/dev/null

python3 - <<EOF
tree, curl, tar, pull = $tree_bytes, $t_curl, $t_tar, $t_pull
print(f"tree: {$FILES} files, {tree/2**20:.0f} MiB; image 1 {$(stat -c %s "$www/images/app-1.cfs")/2**20:.1f} MiB")
print(f"curl one file:        {curl:8.2f} s  ({tree/2**20/curl:.0f} MiB/s)")
print(f"curl | tar xz:        {tar:8.2f} s")
print(f"cold pull (p={$PARALLEL}):     {pull:8.2f} s  ({tree/2**20/pull:.0f} MiB/s)")
print(f"(curl one file + fsync:  {curl + $t_fsync:8.2f} s; creating one file here costs {$t_create} us, x {$FILES} files = {$t_create*$FILES/1e6:.2f} s)")
print(f"cold pull / curl one file      = {pull/curl:.2f}  (goal <= 1.25)")
print(f"cold pull / curl | tar xz      = {pull/tar:.2f}  (goal <= 0.5)")
new, img2, sent = $new_bytes, $img2, $sent
print(f"2nd image: {$reqs} requests, {sent/2**20:.1f} MiB sent for {new/2**20:.1f} MiB new files + {img2/2**20:.2f} MiB image, in {$t_pull2:.2f} s")
print(f"2nd pull bytes / (new + image) = {sent/(new+img2):.3f}  (goal <= 1.05)")
print(f"peak RSS of the cold pull      = {$rss_kib/1024:.0f} MiB")
EOF

#!/usr/bin/env bash
# The demo the README's first command runs: start an image server on
# loopback, publish a sparse disk and a memory-state file, show the catalog
# and the meta-data, fetch the memory state back through the compressed
# channel and verify it, create a persistent disk, then stop.
set -euo pipefail
cd "$(dirname "$0")/.."
VMGRID=${VMGRID:-./bin/vmgrid}
[ -x "$VMGRID" ] || go build -o "$VMGRID" ./cmd/vmgrid

work=$(mktemp -d /tmp/vmgrid-demo.XXXXXX)
port=${VMGRID_DEMO_PORT:-7070}
mport=${VMGRID_DEMO_METRICS_PORT:-9070}
export VMGRID_IMAGESERVER=127.0.0.1:$port

"$VMGRID" imageserver --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" \
	--data-dir "$work/images" --log-console --log-level warn &
server=$!
cleanup() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# Wait until the server answers.
for _ in $(seq 50); do "$VMGRID" image ls >/dev/null 2>&1 && break; sleep 0.1; done

echo "== a 1 GiB sparse disk with 24 MiB of data, and a 64 MiB memory state"
truncate -s 1G "$work/root.raw"
for off in 3 200 611 900; do
	head -c 6M /dev/urandom | dd of="$work/root.raw" bs=1M seek="$off" conv=notrunc status=none
done
{ yes "guest page $RANDOM" | head -c 40M || true; head -c 8M /dev/urandom; head -c 16M /dev/zero; } >"$work/mem.state"

echo "== publish"
"$VMGRID" image publish demo --file disk:root.raw="$work/root.raw" --file memory:mem.state="$work/mem.state" \
	--os demo --memory-mib 256 --label tier=demo
echo "== catalog"
"$VMGRID" image ls
echo "== manifest (policies: disk on demand, memory state whole and compressed)"
"$VMGRID" image get demo | grep -E '"name"|"policy"|"size"|"nonzeroBytes"'
echo "== fetch the memory state through the zstd whole-file channel"
"$VMGRID" image fetch demo mem.state -o "$work/mem.fetched"
cmp "$work/mem.state" "$work/mem.fetched" && echo "fetched copy is identical"
echo "== a persistent disk from the golden disk, without copying it"
"$VMGRID" image create-disk demo-disk --from demo
"$VMGRID" image ls --kind disk
echo "== metrics"
curl -fsS "127.0.0.1:$mport/metrics" 2>/dev/null | grep '^vmgrid_imageserver' || true
echo "== done"

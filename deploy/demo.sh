#!/usr/bin/env bash
# The main job, as the README's first command runs it: bring up an
# all-in-one grid (embedded etcd, image server, two plants, the shop; the
# tiny golden image is built and published on the first start), create a VM
# through the shop, show its classad and console output, destroy it, stop.
# Everything speaks mutual TLS: DIR/env exports the client's certificate
# (VMGRID_TLS_*), which the CLI's --tls-* flags default to.
set -euo pipefail
cd "$(dirname "$0")/.."
VMGRID=${VMGRID:-./bin/vmgrid}
[ -x "$VMGRID" ] || CGO_ENABLED=0 go build -o "$VMGRID" ./cmd/vmgrid

dir=${VMGRID_DEMO_DIR:-/tmp/vmgrid-demo}
shop_port=${VMGRID_DEMO_SHOP_PORT:-7060}
images_port=${VMGRID_DEMO_IMAGES_PORT:-7070}
mkdir -p "$dir"
log="$dir/up.log"
# vmgrid up writes its context here, not into the user's config file.
export VMGRID_CONFIG="$dir/config.yaml"

echo "== vmgrid up (logs in $log; the first start builds the golden image)"
"$VMGRID" up --dir "$dir" --plants 2 --shop-port "$shop_port" --images-port "$images_port" --log-level warn >"$log" 2>&1 &
up=$!
cleanup() {
	kill -INT "$up" 2>/dev/null || true
	wait "$up" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 600); do
	grep -q "vmgrid is up" "$log" 2>/dev/null && break
	kill -0 "$up" 2>/dev/null || { cat "$log"; exit 1; }
	sleep 0.5
done
grep -A20 "vmgrid is up" "$log" | grep -v '^{' || true
# shellcheck disable=SC1091
. "$dir/env"

echo
echo "== the warehouse"
"$VMGRID" image ls

echo
echo "== create a VM through the shop (match, auction, clone, configure)"
out=$("$VMGRID" vm create -o json --request-id "demo-$(date +%s)" --domain demo --hostname demo1 --user alice \
	--ssh-key "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyOnly alice@demo" \
	--exec 'echo "kernel=$(uname -r)" > "$VMGRID_RESULTS"; echo "uptime=$(cut -d" " -f1 /proc/uptime)" >> "$VMGRID_RESULTS"' \
	--exec 'echo "vmgrid demo: $(hostname) is configured; users: $(cut -d: -f1 /etc/passwd | tr "\n" " ")" > /dev/console')
echo "$out"
vm=$(echo "$out" | sed -n 's/.*"vmId": *"\([^"]*\)".*/\1/p' | head -1)
console=$(echo "$out" | sed -n 's/.*"consoleLog": *"\([^"]*\)".*/\1/p' | head -1)

echo
echo "== its console (the guest's serial port, on the plant)"
sleep 0.2
tail -n 15 "$console"

echo
echo "== your VMs"
"$VMGRID" vm ls

echo
echo "== destroy it"
"$VMGRID" vm rm "$vm"
"$VMGRID" vm ls

echo
echo "== a task: input staged in from the data server, command run in a fresh VM, output staged out"
printf 'the quick brown fox jumps over the lazy dog\n' >"$dir/words.txt"
"$VMGRID" data put -q "$dir/words.txt" words.txt
# Outputs go under the task's own prefix (tasks/TASK_ID/): the credential
# the shop gives the plant for the task writes nowhere else.
out=$("$VMGRID" task submit --input words.txt --wait -- 'wc -w < in/words.txt > out/count.txt')
echo "$out"
task=$(echo "$out" | head -1)
"$VMGRID" data get -q "tasks/$task/out/count.txt" "$dir/count.txt"
echo "words counted in the VM: $(cat "$dir/count.txt")"
echo "== done; stopping the grid"

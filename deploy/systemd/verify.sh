#!/usr/bin/env bash
# Checks the units with systemd-analyze verify (when systemd is there).
# verify wants every ExecStart binary to exist, so the units are checked
# as copies that run this checkout's bin/vmgrid instead of
# /usr/local/bin/vmgrid (make build first).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
command -v systemd-analyze >/dev/null || { echo "no systemd-analyze: units not checked"; exit 0; }
[ -x "$repo/bin/vmgrid" ] || { echo "build bin/vmgrid first (make build)" >&2; exit 1; }
tmp=$(mktemp -d /tmp/vmgrid-units.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
for u in "$here"/*.service; do
	sed "s|/usr/local/bin/vmgrid|$repo/bin/vmgrid|g" "$u" >"$tmp/$(basename "$u")"
done
out=$(systemd-analyze verify "$tmp"/*.service 2>&1 || true)
# EnvironmentFile is read at start, not by verify: nothing else may show.
if [ -n "$out" ]; then
	echo "$out" >&2
	exit 1
fi
echo "units OK: $(cd "$here" && ls ./*.service | xargs -n1 basename | paste -sd' ' -)"

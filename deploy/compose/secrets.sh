#!/usr/bin/env bash
# secrets.sh DIR: the compose grid's secrets, made once and kept: DIR/pki
# (vmgrid certs: a CA, one certificate per role, valid for its compose
# service name and 127.0.0.1 — the healthchecks and the ports published on
# the host's loopback), DIR/tokens (owner demo, the operator, the
# services), DIR/service.token, DIR/task.key. Plants make their own
# certificate at start (plant-entrypoint.sh): their names are not known
# before.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
VMGRID=${VMGRID:-$repo/bin/vmgrid}
dir=$1
mkdir -p "$dir"
names=(etcd1 etcd2 etcd3 root shop imageserver dataserver cacheproxy client)
hosts=127.0.0.1,localhost,etcd1,etcd2,etcd3,shop,imageserver,dataserver,cacheproxy
"$VMGRID" certs --dir "$dir/pki" --hosts "$hosts" "${names[@]}" >/dev/null
# The plants make their certificates with the CA inside their containers.
chmod 0755 "$dir/pki"
hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
if [ ! -f "$dir/tokens" ]; then
	svc=$(hex 24)
	umask 077
	printf '# TOKEN NAME [owner|operator|publisher|service] (README, "Who may call what")\n%s demo owner\n%s operator operator\n%s vmgrid service\n' \
		"$(hex 24)" "$(hex 24)" "$svc" >"$dir/tokens"
	echo "$svc" >"$dir/service.token"
	echo "$(hex 32)" >"$dir/task.key"
fi

#!/usr/bin/env bash
# make compose-up: the compose grid, from nothing to a grid `vmgrid vm
# create` works against. Starts dockerd if needed, builds the images
# (images.sh, cached), makes the grid's secrets in $VMGRID_COMPOSE_DIR/grid
# (a CA and certificates by `vmgrid certs`, the tokens file, the services'
# token, the task key: kept across restarts), starts the project
# (VMGRID_COMPOSE_PROJECT, default vmgrid) with VMGRID_PLANTS plants (3)
# and VMGRID_SHOPS shops (2), publishes the tiny golden image once (built on
# this host: QEMU and the kernel cache are here), and writes a client
# context "compose" into $VMGRID_COMPOSE_DIR/config.yaml and the same as
# variables in $VMGRID_COMPOSE_DIR/env (`. $VMGRID_COMPOSE_DIR/env`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/grid.sh"
plants=${VMGRID_PLANTS:-3}
shops=${VMGRID_SHOPS:-2}
VMGRID=${VMGRID:-$repo/bin/vmgrid}

docker_start
[ "${VMGRID_SKIP_IMAGES:-}" = 1 ] || "$here/images.sh"
[ -x "$VMGRID" ] || (cd "$repo" && CGO_ENABLED=0 go build -o "$VMGRID" ./cmd/vmgrid)
"$here/secrets.sh" "$VMGRID_COMPOSE_DIR/grid"

echo "starting $project: 3 etcd members, image server, data server, cache proxy, $shops shops, $plants plants"
compose up -d --scale "plant=$plants" --scale "shop=$shops"

port() { compose port --index="${3:-1}" "$1" "$2" | sed 's/.*://'; }
g=$VMGRID_COMPOSE_DIR/grid
shop=127.0.0.1:$(port shop 7060)
images=127.0.0.1:$(port imageserver 7070)
data=127.0.0.1:$(port dataserver 7090)
token=$(awk '$2 == "demo" {print $1}' "$g/tokens")
op=$(awk '$3 == "operator" {print $1; exit}' "$g/tokens")
tls=(--tls-ca "$g/pki/ca.pem" --tls-cert "$g/pki/client.pem" --tls-key "$g/pki/client-key.pem")

if ! VMGRID_CONFIG=/dev/null "$VMGRID" image get tiny --server "$images" --token "$op" "${tls[@]}" >/dev/null 2>&1; then
	echo "building and publishing the tiny golden image to the grid's image server ($images)"
	VMGRID_CONFIG=/dev/null "$VMGRID" image build tiny --server "$images" --token "$op" "${tls[@]}" --log-level warn
fi

cat >"$VMGRID_COMPOSE_DIR/config.yaml" <<YAML
current-context: compose
contexts:
  compose:
    shop: $shop
    image-server: $images
    data-server: $data
    token: $token
    operator-token: $op
    tls-ca: $g/pki/ca.pem
    tls-cert: $g/pki/client.pem
    tls-key: $g/pki/client-key.pem
YAML
chmod 600 "$VMGRID_COMPOSE_DIR/config.yaml"
cat >"$VMGRID_COMPOSE_DIR/env" <<ENV
export VMGRID_COMPOSE_DIR=$VMGRID_COMPOSE_DIR VMGRID_CONFIG=$VMGRID_COMPOSE_DIR/config.yaml
export VMGRID_SHOP=$shop VMGRID_IMAGESERVER=$images VMGRID_DATASERVER=$data
export VMGRID_TOKEN=$token VMGRID_OPERATOR_TOKEN=$op
export VMGRID_TLS_CA=$g/pki/ca.pem VMGRID_TLS_CERT=$g/pki/client.pem VMGRID_TLS_KEY=$g/pki/client-key.pem
ENV
echo "the compose grid is up: shop $shop, image server $images, data server $data"
echo "  . $VMGRID_COMPOSE_DIR/env   # or VMGRID_CONFIG=$VMGRID_COMPOSE_DIR/config.yaml (context \"compose\")"
echo "  vmgrid vm create --hostname web1 --exec 'uname -a'"

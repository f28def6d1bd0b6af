# Sourced by up.sh and down.sh (after setting here=): the grid's directory
# (VMGRID_COMPOSE_DIR, also dockerd's state when these scripts start it),
# its compose project (VMGRID_COMPOSE_PROJECT) and docker-compose on it.
repo=$(cd "$here/../.." && pwd)
export VMGRID_COMPOSE_DIR=${VMGRID_COMPOSE_DIR:-/tmp/vmgrid-compose}
export VMGRID_COMPOSE_STATE=${VMGRID_COMPOSE_STATE:-$VMGRID_COMPOSE_DIR}
project=${VMGRID_COMPOSE_PROJECT:-vmgrid}
# shellcheck source=docker.sh
. "$here/docker.sh"
compose() { docker-compose -p "$project" -f "$repo/deploy/compose.yaml" "$@"; }

#!/usr/bin/env bash
# make compose-down: the compose grid gone, leaving nothing: its
# containers (the plants' QEMU guests and FUSE mounts live and die in
# them), volumes and network, its secrets directory, and dockerd when
# up.sh started it. Images stay (make images-clean removes them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/grid.sh"
if docker_up; then
	compose down -v --remove-orphans -t 30
	left=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$project")
	[ -z "$left" ] || "$DOCKER" rm -fv $left
fi
[ "${VMGRID_KEEP_DOCKERD:-}" = 1 ] || docker_stop
rm -rf "$VMGRID_COMPOSE_DIR/grid" "$VMGRID_COMPOSE_DIR/config.yaml" "$VMGRID_COMPOSE_DIR/env"
echo "compose grid $project is down"

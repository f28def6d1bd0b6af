#!/usr/bin/env bash
# make images: builds the compose grid's local images from nothing (there
# is no registry): vmgrid:local, FROM scratch with the static vmgrid binary
# (every role but the plant, etcd included), and vmgrid-plant:local over the
# debootstrapped base (plant-base.sh, cached by its package list). The Go
# build reuses GOCACHE, so a second run costs seconds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/docker.sh"
docker_start

ctx=$(mktemp -d /tmp/vmgrid-images.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
echo "building the static binaries (CGO_ENABLED=0)"
(cd "$repo" && CGO_ENABLED=0 go build -o "$ctx/vmgrid" ./cmd/vmgrid && CGO_ENABLED=0 go build -o "$ctx/vmgrid-agent" ./cmd/vmgrid-agent)
# scratch has no directories: the roles need /tmp and their data roots.
mkdir -p "$ctx/rootfs/tmp" "$ctx/rootfs/var/lib/vmgrid"
chmod 1777 "$ctx/rootfs/tmp"
cp "$here/plant-entrypoint.sh" "$ctx/"

build() { # TAG DOCKERFILE [ARGS...]
	local tag=$1 file=$2
	shift 2
	# The classic builder: no BuildKit/buildx needed (Debian's docker.io);
	# its output is shown only when the build fails.
	local out
	if ! out=$(DOCKER_BUILDKIT=0 "$DOCKER" build -t "$tag" -f "$file" "$@" "$ctx" 2>&1); then
		echo "$out" >&2
		return 1
	fi
	echo "built $tag"
}
build vmgrid:local "$here/images/vmgrid.Dockerfile"
base=$("$here/plant-base.sh")
build vmgrid-plant:local "$here/images/plant.Dockerfile" --build-arg "BASE=$base"
# Earlier builds' layers that no tag names any more (ours only: label vmgrid).
"$DOCKER" image prune -f --filter label=vmgrid >/dev/null

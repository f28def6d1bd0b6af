#!/usr/bin/env bash
# Builds the plant's base image: a Debian root made here by debootstrap
# (minbase plus plant-packages.txt) from the mirror of this machine's own
# apt sources, `docker import`ed as vmgrid-plant-base:HASH, HASH being the
# digest of the package list and suite. An image with that tag is reused:
# only a changed list rebuilds it. Prints the tag.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
DOCKER=${DOCKER:-docker}

# apt_source prints "MIRROR SUITE" of the first Debian source of this
# machine: deb822 files first (URIs:/Suites:), then sources.list.
apt_source() {
	local f
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk '/^URIs:/ && !u {u=$2} /^Suites:/ && !s {s=$2} END {if (u && s) print u, s}' "$f" | grep . && return 0
	done
	if [ -f /etc/apt/sources.list ]; then
		awk '$1 == "deb" {print $2, $3; exit}' /etc/apt/sources.list | grep . && return 0
	fi
	echo "no apt source found in /etc/apt (the base is made from this machine's mirror)" >&2
	return 1
}

read -r mirror suite < <(apt_source)
pkgs=$(grep -vE '^\s*(#|$)' "$here/plant-packages.txt" | sort | paste -sd, -)
hash=$(printf '%s\n%s\n' "$suite" "$pkgs" | sha256sum | cut -c1-12)
tag=vmgrid-plant-base:$hash
if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
	echo "$tag"
	exit 0
fi
cache=${VMGRID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmgrid}/debootstrap-debs
mkdir -p "$cache"
root=$(mktemp -d /tmp/vmgrid-plant-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap $suite (minbase + $pkgs) from the apt sources' mirror into $root" >&2
debootstrap --variant=minbase --include="$pkgs" --cache-dir="$cache" "$suite" "$root" "$mirror" >&2
# What a container never needs: apt's lists, docs, man pages, locales.
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | "$DOCKER" import --change 'LABEL vmgrid=plant-base' - "$tag" >&2
echo "$tag"

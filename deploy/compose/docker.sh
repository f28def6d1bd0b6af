#!/usr/bin/env bash
# Starts the Docker daemon when none is running, and stops it again only
# when this script started it (the pid file under the state directory says
# so). Sourced by the other compose scripts, or run: docker.sh start|stop.
#
# dockerd runs with --iptables=false --ip-forward=false --bridge=none: it
# must not change the host's firewall (its FORWARD policy DROP would cut
# bridged traffic of everything else on this machine, br_netfilter being
# loaded) and the grid needs no NAT — containers talk on their own compose
# network and the host reaches them through ports published on 127.0.0.1.
set -euo pipefail

VMGRID_COMPOSE_STATE=${VMGRID_COMPOSE_STATE:-/tmp/vmgrid-compose}
DOCKER=${DOCKER:-docker}

docker_up() { "$DOCKER" info >/dev/null 2>&1; }

docker_start() {
	docker_up && return 0
	mkdir -p "$VMGRID_COMPOSE_STATE"
	command -v dockerd >/dev/null || { echo "dockerd is not installed (make setup: docker.io)" >&2; return 1; }
	echo "starting dockerd (log: $VMGRID_COMPOSE_STATE/dockerd.log)"
	dockerd --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
		>"$VMGRID_COMPOSE_STATE/dockerd.log" 2>&1 &
	echo $! >"$VMGRID_COMPOSE_STATE/dockerd.pid"
	for _ in $(seq 120); do
		docker_up && return 0
		kill -0 "$(cat "$VMGRID_COMPOSE_STATE/dockerd.pid")" 2>/dev/null || break
		sleep 0.5
	done
	echo "dockerd did not come up:" >&2
	tail -n 20 "$VMGRID_COMPOSE_STATE/dockerd.log" >&2
	return 1
}

docker_stop() {
	local pidfile=$VMGRID_COMPOSE_STATE/dockerd.pid
	[ -f "$pidfile" ] || return 0 # not ours: leave it running
	local pid
	pid=$(cat "$pidfile")
	if kill -0 "$pid" 2>/dev/null; then
		echo "stopping the dockerd this script started (pid $pid)"
		kill -TERM "$pid"
		for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
	fi
	rm -f "$pidfile"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	case "${1:-}" in
	start) docker_start ;;
	stop) docker_stop ;;
	*) echo "usage: $0 start|stop" >&2; exit 2 ;;
	esac
fi

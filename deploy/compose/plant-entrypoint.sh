#!/bin/sh
# A plant container's start: its identity is its container (hostname, which
# Docker's DNS resolves on the compose network, so it survives a changed IP
# address), its certificate is made here for that name by the grid's CA
# (mounted read-only at /grid/pki), and etcd knows it as the user "plant".
# The arguments are passed on to vmgrid computeserver.
set -eu
host=$(hostname)
pki=/run/vmgrid-pki
rm -rf "$pki"
mkdir -p "$pki"
cp /grid/pki/ca.pem /grid/pki/ca-key.pem "$pki/"
vmgrid certs --dir "$pki" --hosts "$host,127.0.0.1,localhost" plant >/dev/null
rm -f "$pki/ca-key.pem"
exec vmgrid computeserver --name "plant-$host" --listen 0.0.0.0:7080 --advertise "$host:7080" \
	--tls-cert "$pki/plant.pem" --tls-key "$pki/plant-key.pem" --tls-ca "$pki/ca.pem" \
	--etcd-cert "$pki/plant.pem" --etcd-key "$pki/plant-key.pem" --etcd-cacert "$pki/ca.pem" \
	"$@"

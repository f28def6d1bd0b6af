# The roles that need only themselves (etcd — vmgrid etcd is etcd's own
# server, go.etcd.io/etcd/server/v3 embedded —, image server, data server,
# shop, cache proxy): the static vmgrid binary and nothing else.
FROM scratch
COPY rootfs/ /
COPY vmgrid /vmgrid
LABEL vmgrid=role
ENTRYPOINT ["/vmgrid"]

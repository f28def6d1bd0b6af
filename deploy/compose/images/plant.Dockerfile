# The plant: QEMU, FUSE, e2fsprogs… from the Debian base plant-base.sh made
# with debootstrap, plus vmgrid, its guest agent and the entrypoint that
# gives each plant its own identity.
ARG BASE
FROM ${BASE}
COPY vmgrid vmgrid-agent /usr/local/bin/
COPY plant-entrypoint.sh /usr/local/bin/
LABEL vmgrid=plant
ENTRYPOINT ["/usr/local/bin/plant-entrypoint.sh"]

#!/usr/bin/env bash
# Makes the base image the svcbroker Dockerfile starts FROM
# (debian:bookworm-slim) available locally.
#
# On a machine that reaches a container registry this is a plain pull. On
# machines without one (svcbroker's own CI), the image is built from Debian's
# packages with debootstrap and imported under the same tag, with the service
# daemons (redis-server, memcached) preinstalled so that building the
# svcbroker image needs no network at all.
set -euo pipefail

BASE_TAG="${SVCBROKER_BASE_IMAGE:-debian:bookworm-slim}"
PACKAGES="redis-server,memcached,ca-certificates,procps,netbase"

if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    echo "base image $BASE_TAG: present"
    exit 0
fi
if timeout 60 docker pull "$BASE_TAG" >/dev/null 2>&1; then
    echo "base image $BASE_TAG: pulled"
    exit 0
fi

echo "base image $BASE_TAG: no registry answered, building it with debootstrap" >&2
if ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
rootfs="$(mktemp -d /tmp/svcbroker-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
# debootstrap's own default mirror is used: nothing here names a registry.
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" >"$rootfs.log" 2>&1 || {
    tail -20 "$rootfs.log" >&2
    exit 1
}
rm -f "$rootfs.log"
# Keep the image small: package lists and caches are not needed at run time.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
echo "base image $BASE_TAG: built from debootstrap"

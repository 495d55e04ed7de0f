#!/usr/bin/env bash
# Make the local base image when no registry can be reached: a Debian bookworm root filesystem
# from debootstrap (python3.11, venv, pip, prometheus), imported with `docker import`.
# Usage: deploy/make-base-image.sh [IMAGE]   (default hffm-base:bookworm; kept if it exists)
set -euo pipefail
IMAGE=${1:-hffm-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d /tmp/hffm-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,ca-certificates,prometheus,passwd \
  bookworm "$root" "$MIRROR" >/tmp/hffm-debootstrap.log 2>&1 \
  || { tail -20 /tmp/hffm-debootstrap.log >&2; exit 1; }
# keep it small: no apt lists, caches, docs
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  -c 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE made from debootstrap"

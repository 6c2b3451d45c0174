#!/bin/sh
# Build tma-local/redis:7 (Debian 12's redis-server 7.0) without any image registry: debootstrap a
# minimal rootfs, `docker import` it. Runs as user redis, data in /data, listens on all interfaces of
# the container with protected mode off: publish its port to 127.0.0.1 only, if at all.
# Idempotent: does nothing when the image exists (FORCE=1 rebuilds). Starts the Docker engine if needed.
# Usage: docker/images/redis/build.sh
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
LOG_TAG=redis-image
. "$HERE/../common.sh"

SUITE=${SUITE:-bookworm}
IMAGE=${IMAGE:-tma-local/redis:7}

ensure_engine
build_lock "$IMAGE"
if image_exists "$IMAGE" && [ "${FORCE:-0}" != 1 ]; then
  log "$IMAGE exists, nothing to do"
  exit 0
fi

start=$(date +%s)
ROOT=$(make_rootfs redis "$SUITE" redis-server)
trap 'remove_rootfs "$ROOT"' EXIT INT TERM
slim_rootfs "$ROOT"
# /data belongs to redis (numeric ids of the rootfs); a fresh named volume inherits that ownership
mkdir -p "$ROOT/data"
chroot "$ROOT" chown redis:redis /data
log "importing $IMAGE"
import_rootfs "$ROOT" "$IMAGE" \
  --change 'ENV LANG=C.UTF-8' \
  --change 'USER redis' \
  --change 'WORKDIR /data' \
  --change 'VOLUME /data' \
  --change 'EXPOSE 6379' \
  --change 'ENTRYPOINT ["redis-server"]' \
  --change 'CMD ["--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data"]' \
  --change 'LABEL org.opencontainers.image.title=tma-local/redis'
log "built $IMAGE in $(( $(date +%s) - start )) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

#!/bin/sh
# Build the worker image tma-local/tma-backup-worker:latest from the repository's Dockerfile.
#   1. tma-local/python-base:bookworm, once: a debootstrapped Debian 12 rootfs with python3 (3.11),
#      python3-venv, postgresql-client-15, ca-certificates and tini, `docker import`ed (no registry).
#   2. `docker build` of the repo root with BuildKit. pip reaches PyPI only through this machine's CA
#      bundle: it is handed to the build as a BuildKit secret (mounted for the pip steps only, in no
#      layer, never copied into the repository).
# Step 2 always runs (the build cache makes an unchanged tree a no-op of a few seconds) so the image
# follows the working tree; SKIP_IF_EXISTS=1 skips it when the image exists. FORCE_BASE=1 rebuilds step 1.
# Usage: docker/images/worker/build.sh
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
LOG_TAG=worker-image
. "$HERE/../common.sh"

BASE_IMAGE=${BASE_IMAGE:-tma-local/python-base:bookworm}
IMAGE=${IMAGE:-tma-local/tma-backup-worker:latest}
PIP_CA_BUNDLE=${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

ensure_engine

build_lock "$BASE_IMAGE"
if image_exists "$BASE_IMAGE" && [ "${FORCE_BASE:-0}" != 1 ]; then
  log "$BASE_IMAGE exists, reusing it"
else
  start=$(date +%s)
  ROOT=$(make_rootfs python-base bookworm \
    "python3,python3-venv,postgresql-client-15,ca-certificates,tini")
  trap 'remove_rootfs "$ROOT"' EXIT INT TERM
  slim_rootfs "$ROOT"
  log "importing $BASE_IMAGE"
  import_rootfs "$ROOT" "$BASE_IMAGE" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change 'LABEL org.opencontainers.image.title=tma-local/python-base'
  remove_rootfs "$ROOT"; trap - EXIT INT TERM
  log "built $BASE_IMAGE in $(( $(date +%s) - start )) s"
fi

if [ "${SKIP_IF_EXISTS:-0}" = 1 ] && image_exists "$IMAGE"; then
  log "$IMAGE exists and SKIP_IF_EXISTS=1, not rebuilding"
  exit 0
fi
[ -r "$PIP_CA_BUNDLE" ] || die "CA bundle $PIP_CA_BUNDLE is not readable (pip needs it to reach PyPI)"
DOCKER=$(buildkit_docker)
start=$(date +%s)
log "building $IMAGE from $REPO/Dockerfile with $DOCKER (BuildKit)"
DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain \
  --secret "id=pip_cert,src=$PIP_CA_BUNDLE" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO" </dev/null >&2 \
  || die "docker build of $IMAGE failed"
log "built $IMAGE in $(( $(date +%s) - start )) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

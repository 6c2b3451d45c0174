#!/bin/sh
# Build the worker image tma-local/tma-backup-worker:latest from the repository's Dockerfile.
#   1. tma-local/python-base:bookworm, once: a debootstrapped Debian 12 rootfs with python3 (3.11),
#      python3-venv, postgresql-client-15, restic (0.14), zstd, ca-certificates and tini, `docker import`ed (no
#      registry). The package list is kept in the image's label tma.base.packages: a base whose label
#      differs from BASE_PACKAGES below (an older one, without restic say) is built again, and the worker
#      image after it.
#   2. `docker build` of the repo root with BuildKit. pip reaches PyPI only through this machine's CA
#      bundle: it is handed to the build as a BuildKit secret (mounted for the pip steps only, in no
#      layer, never copied into the repository).
# Step 2 always runs (the build cache makes an unchanged tree a no-op of a few seconds) so the image
# follows the working tree; SKIP_IF_EXISTS=1 skips it when the image exists (unless step 1 just rebuilt the
# base). FORCE_BASE=1 rebuilds step 1.
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

# What the base holds (debootstrap --include, comma-separated, no spaces); changing it rebuilds the base.
BASE_PACKAGES=python3,python3-venv,postgresql-client-15,restic,zstd,ca-certificates,tini

build_lock "$BASE_IMAGE"
base_packages=$(docker image inspect -f '{{ index .Config.Labels "tma.base.packages" }}' "$BASE_IMAGE" 2>/dev/null || true)
base_built=0
if image_exists "$BASE_IMAGE" && [ "$base_packages" = "$BASE_PACKAGES" ] && [ "${FORCE_BASE:-0}" != 1 ]; then
  log "$BASE_IMAGE exists with the same packages, reusing it"
else
  if image_exists "$BASE_IMAGE" && [ "${FORCE_BASE:-0}" != 1 ]; then
    log "$BASE_IMAGE has packages '${base_packages:-(not labelled)}', want '$BASE_PACKAGES': rebuilding it"
  fi
  old_base=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)
  start=$(date +%s)
  ROOT=$(make_rootfs python-base bookworm "$BASE_PACKAGES")
  trap 'remove_rootfs "$ROOT"' EXIT INT TERM
  slim_rootfs "$ROOT"
  log "importing $BASE_IMAGE"
  import_rootfs "$ROOT" "$BASE_IMAGE" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change 'LABEL org.opencontainers.image.title=tma-local/python-base' \
    --change "LABEL tma.base.packages=$BASE_PACKAGES"
  remove_rootfs "$ROOT"; trap - EXIT INT TERM
  base_built=1
  # The replaced base is now untagged: drop it (kept if something still uses it).
  if [ -n "$old_base" ] && [ "$old_base" != "$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")" ]; then
    docker image rm "$old_base" >/dev/null 2>&1 || true
  fi
  log "built $BASE_IMAGE in $(( $(date +%s) - start )) s"
fi

if [ "${SKIP_IF_EXISTS:-0}" = 1 ] && [ "$base_built" = 0 ] && image_exists "$IMAGE"; then
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

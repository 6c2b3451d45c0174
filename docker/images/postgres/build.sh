#!/bin/sh
# Build tma-local/postgres:$PG_MAJOR without any image registry: debootstrap a minimal Debian rootfs
# with PostgreSQL from the mirror apt already uses, then `docker import` it.
#   PG_MAJOR=15 (default) -> Debian 12 (bookworm); PG_MAJOR=17 -> Debian 13 (trixie);
#   PG_MAJOR=18 -> Debian unstable (sid: no stable release ships 18 yet; TMA Cloud runs postgres:18-alpine)
#   (the mapping is pg_suite in ../common.sh, shared with the worker image's client tools; sid keeps one
#   major only: once it has moved on from 18, build with SUITE=<a suite that still ships it>)
# Idempotent: does nothing when the image exists (FORCE=1 rebuilds). Starts the Docker engine if needed.
# Runs no container. Stop containers with SIGINT (fast shutdown): `docker import` cannot set STOPSIGNAL.
# Usage: docker/images/postgres/build.sh [PG_MAJOR]
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
LOG_TAG=postgres-image
. "$HERE/../common.sh"

PG_MAJOR=${1:-${PG_MAJOR:-15}}
SUITE=${SUITE:-$(pg_suite "$PG_MAJOR" || true)}
[ -n "$SUITE" ] || die "no Debian suite known for PostgreSQL $PG_MAJOR: set SUITE"
IMAGE=${IMAGE:-tma-local/postgres:$PG_MAJOR}

ensure_engine
build_lock "$IMAGE"
if image_exists "$IMAGE" && [ "${FORCE:-0}" != 1 ]; then
  log "$IMAGE exists, nothing to do"
  exit 0
fi

start=$(date +%s)
ROOT=$(make_rootfs "postgres-$PG_MAJOR" "$SUITE" "postgresql-$PG_MAJOR,postgresql-client-$PG_MAJOR")
trap 'remove_rootfs "$ROOT"' EXIT INT TERM
# the package's own cluster is not wanted: the entrypoint initialises PGDATA on first start
rm -rf "$ROOT/etc/postgresql/$PG_MAJOR/main" "$ROOT/var/lib/postgresql/$PG_MAJOR"
slim_rootfs "$ROOT"
install -m 755 "$HERE/docker-entrypoint.sh" "$ROOT/usr/local/bin/docker-entrypoint.sh"
log "importing $IMAGE"
import_rootfs "$ROOT" "$IMAGE" \
  --change "ENV PATH=/usr/lib/postgresql/$PG_MAJOR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --change 'ENV PGDATA=/var/lib/postgresql/data' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
  --change 'EXPOSE 5432' \
  --change 'VOLUME /var/lib/postgresql/data' \
  --change "LABEL org.opencontainers.image.title=tma-local/postgres org.tma.pg-major=$PG_MAJOR org.tma.debian-suite=$SUITE"
log "built $IMAGE in $(( $(date +%s) - start )) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

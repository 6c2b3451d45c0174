#!/bin/sh
# Build the worker image tma-local/tma-backup-worker:latest from the repository's Dockerfile.
#   1. tma-local/worker-base:latest, once: a debootstrapped Debian 13 (trixie) rootfs with python3 (3.13),
#      python3-venv, restic (0.18), zstd, ca-certificates and tini, plus the client tools (pg_dump,
#      pg_restore, psql) of every PostgreSQL major we support, PG_CLIENT_MAJORS in docker/images/common.sh
#      (15 17 18), each from the suite whose own archive ships it (pg_suite: bookworm, trixie, sid), side by
#      side in /usr/lib/postgresql/<major>/bin; the worker runs the server's own major's, and the newest's
#      (PG_CLIENT_MAJOR, 18) come first on PATH. From bookworm and sid only postgresql-client-15,
#      postgresql-client-18 and libpq5 are taken, pinned by name (every other dependency is trixie's: the
#      18 client needs libc6 >= 2.38, trixie has 2.41, bookworm's 2.36 is why the base left bookworm); their
#      sources are removed from the image afterwards. `docker import`ed (no registry). What the base is made
#      of is kept in its label tma.base.recipe: a base whose label differs from BASE_RECIPE below (an older
#      one, with postgresql-client-15 alone say) is built again, and the worker image after it. Its labels
#      org.tma.pg-client-major and org.tma.pg-client-majors name the newest major and all of them.
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

BASE_IMAGE=${BASE_IMAGE:-tma-local/worker-base:latest}
IMAGE=${IMAGE:-tma-local/tma-backup-worker:latest}
PIP_CA_BUNDLE=${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

ensure_engine

# What the base holds: the base suite's packages (debootstrap --include, comma-separated, no spaces) and
# postgresql-client-<major> for each of PG_CLIENT_MAJORS from its own suite (pg_suite), libpq5 from the
# newest's; changing any of it rebuilds the base.
BASE_SUITE=${BASE_SUITE:-trixie}
BASE_PACKAGES=python3,python3-venv,restic,zstd,ca-certificates,tini
base_clients=           # clients the base suite ships: in debootstrap's --include
extra_suites=           # the other suites clients come from
extra_packages=         # and their packages
pins=                   # apt preferences for them: each package at 990 from its suite
BASE_RECIPE="$BASE_SUITE:$BASE_PACKAGES"
for major in $PG_CLIENT_MAJORS; do
  suite=$(pg_suite "$major") || die "no Debian suite known for PostgreSQL $major's client tools: add it to pg_suite in docker/images/common.sh"
  BASE_RECIPE="$BASE_RECIPE;$suite:postgresql-client-$major"
  if [ "$suite" = "$BASE_SUITE" ]; then
    base_clients="$base_clients,postgresql-client-$major"
    continue
  fi
  case " $extra_suites " in *" $suite "*) ;; *) extra_suites="$extra_suites $suite" ;; esac
  packages="postgresql-client-$major"
  # libpq5 as new as the newest client (an older client runs with a newer libpq: its ABI is stable)
  [ "$major" != "$PG_CLIENT_MAJOR" ] || packages="$packages libpq5"
  extra_packages="$extra_packages postgresql-client-$major"
  pins="${pins}Package: $packages
Pin: release n=$suite
Pin-Priority: 990

"
done
[ "$(pg_suite "$PG_CLIENT_MAJOR")" = "$BASE_SUITE" ] || BASE_RECIPE="$BASE_RECIPE;$(pg_suite "$PG_CLIENT_MAJOR"):libpq5"

# apt-get inside the rootfs (no /proc needed for these packages; no pty for dpkg's log; no translations
# fetched). Valid-Until is checked as this machine's apt checks it (a mirror that is a snapshot has a
# Release file past its date).
# usage: chroot_apt ROOT APT-GET-ARGS...
chroot_apt() {
  apt_root=$1; shift
  valid_until=$(apt-config shell v Acquire::Check-Valid-Until | sed -n "s/^v='\(.*\)'$/\1/p")
  chroot "$apt_root" env DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 apt-get -q -o Dpkg::Use-Pty=0 \
    -o Acquire::Languages=none ${valid_until:+-o Acquire::Check-Valid-Until=$valid_until} "$@"
}

# The clients from other suites: each suite's source at priority 100 (never chosen on its own), the named
# packages at 990; everything they need that the base suite has comes from the base suite. The extra
# sources and pins are removed again. usage: install_clients ROOT
install_clients() {
  root=$1
  mirror=$(debian_mirror)
  for suite in $extra_suites; do
    printf 'deb %s %s main\n' "$mirror" "$suite"
  done >"$root/etc/apt/sources.list.d/tma-pg-clients.list"
  { for suite in $extra_suites; do
      printf 'Package: *\nPin: release n=%s\nPin-Priority: 100\n\n' "$suite"
    done
    printf '%s' "$pins"; } >"$root/etc/apt/preferences.d/tma-pg-clients"
  log "installing$extra_packages from$extra_suites into the $BASE_SUITE rootfs"
  # shellcheck disable=SC2086
  if ! { chroot_apt "$root" update && chroot_apt "$root" install -y --no-install-recommends $extra_packages; } \
       >"$root.apt.log" 2>&1; then
    tail -n 30 "$root.apt.log" >&2
    die "apt-get could not install$extra_packages from$extra_suites into the $BASE_SUITE rootfs (log $root.apt.log)"
  fi
  rm -f "$root.apt.log" "$root/etc/apt/sources.list.d/tma-pg-clients.list" "$root/etc/apt/preferences.d/tma-pg-clients"
}

build_lock "$BASE_IMAGE"
base_recipe=$(docker image inspect -f '{{ index .Config.Labels "tma.base.recipe" }}' "$BASE_IMAGE" 2>/dev/null || true)
base_built=0
if image_exists "$BASE_IMAGE" && [ "$base_recipe" = "$BASE_RECIPE" ] && [ "${FORCE_BASE:-0}" != 1 ]; then
  log "$BASE_IMAGE exists with the same packages, reusing it"
else
  if image_exists "$BASE_IMAGE" && [ "${FORCE_BASE:-0}" != 1 ]; then
    log "$BASE_IMAGE is '${base_recipe:-(not labelled)}', want '$BASE_RECIPE': rebuilding it"
  fi
  old_base=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)
  start=$(date +%s)
  ROOT=$(make_rootfs worker-base "$BASE_SUITE" "$BASE_PACKAGES$base_clients")
  trap 'remove_rootfs "$ROOT"' EXIT INT TERM
  [ -z "$extra_suites" ] || install_clients "$ROOT"
  # each major's tools answer with that major, or the base is not made
  for major in $PG_CLIENT_MAJORS; do
    for tool in pg_dump pg_restore psql; do
      version=$(chroot "$ROOT" "/usr/lib/postgresql/$major/bin/$tool" --version 2>&1) ||
        die "/usr/lib/postgresql/$major/bin/$tool does not run in the rootfs: $version"
      case $version in
        *"(PostgreSQL) $major."*) ;;
        *) die "/usr/lib/postgresql/$major/bin/$tool says '$version', not PostgreSQL $major" ;;
      esac
    done
  done
  slim_rootfs "$ROOT"
  log "importing $BASE_IMAGE (client tools of PostgreSQL $PG_CLIENT_MAJORS; $PG_CLIENT_MAJOR's first on PATH)"
  import_rootfs "$ROOT" "$BASE_IMAGE" \
    --change "ENV PATH=/usr/lib/postgresql/$PG_CLIENT_MAJOR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change 'LABEL org.opencontainers.image.title=tma-local/worker-base' \
    --change "LABEL org.tma.pg-client-major=$PG_CLIENT_MAJOR" \
    --change "LABEL org.tma.pg-client-majors=$(echo "$PG_CLIENT_MAJORS" | tr ' ' ',')" \
    --change "LABEL tma.base.recipe=$BASE_RECIPE"
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

# Shared helpers for the image build scripts (sourced, not run).
# Images are built without any image registry: debootstrap a Debian rootfs from the mirror apt already
# uses, then `docker import` it. Everything logs to stderr; nothing reads stdin.

log() { printf '[%s] %s\n' "${LOG_TAG:-tma-docker}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

export DEBIAN_FRONTEND=noninteractive

# The PostgreSQL majors tma-backup supports, oldest to newest, chosen here once. The worker image carries
# the client tools (pg_dump, pg_restore, psql) of each (docker/images/worker/build.sh) and the worker runs
# the server's own major's (worker/pg/executors/host.py): a pg_dump newer than its server writes archives
# that server cannot restore (PostgreSQL promises a dump loads into servers of the pg_dump's major or newer;
# checked here: pg_restore 18 sends `SET transaction_timeout`, which 15 refuses, and pg_restore 15 cannot
# read pg_dump 18's archive). The newest, PG_CLIENT_MAJOR, comes first on the image's PATH; it must be at
# least TMA Cloud's (18: postgres:18-alpine), so that the stack reaches its database over the network
# (DB_MODE=host) with no Docker socket. Add the next major here (and its suite to pg_suite) before TMA
# Cloud's PostgreSQL moves past it: a pg_dump older than its server refuses to run. The image's labels
# org.tma.pg-client-major(s) say what an image holds; tests/test_worker_image.py reads this line.
PG_CLIENT_MAJORS="15 17 18"
PG_CLIENT_MAJOR=${PG_CLIENT_MAJORS##* }

# The Debian suite whose own archive ships PostgreSQL MAJOR (Debian keeps one major per release; sid moves
# on to the next one in time: then name here a suite that still has it, or build the postgres image with
# SUITE=). usage: pg_suite MAJOR
pg_suite() {
  case $1 in
    15) echo bookworm ;;
    17) echo trixie ;;
    18) echo sid ;;
    *) return 1 ;;
  esac
}

ROOTFS_BASE=${ROOTFS_BASE:-/var/tmp/tma-rootfs}   # scratch rootfs trees live here, never in the repo
DOCKERD_LOG=${DOCKERD_LOG:-/var/tmp/tma-dockerd.log}
DOCKERD_PID=${DOCKERD_PID:-/var/tmp/tma-dockerd.pid}

# apt-get install the named packages when any of their commands is missing.
# usage: need_pkgs "cmd1 cmd2" pkg1 pkg2 ...
need_pkgs() {
  cmds=$1; shift
  for c in $cmds; do
    if ! command -v "$c" >/dev/null 2>&1; then
      [ "$(id -u)" = 0 ] || die "$c is missing and installing it needs root"
      log "installing $* (missing: $c)"
      apt-get install -y -q "$@" </dev/null >/dev/null || die "apt-get install $* failed"
      return 0
    fi
  done
}

# Make sure a Docker engine answers; start dockerd in the background if none does.
ensure_engine() {
  need_pkgs "dockerd docker" docker.io
  if docker info >/dev/null 2>&1; then return 0; fi
  [ "$(id -u)" = 0 ] || die "the Docker engine is not running and starting it needs root"
  log "starting dockerd (log $DOCKERD_LOG, pid file $DOCKERD_PID)"
  # Started from a subshell so that dockerd is not a child of the calling script: a later bare `wait`
  # there (ci-setup.sh waits for its image builds) must never wait for the engine.
  ( nohup setsid dockerd </dev/null >>"$DOCKERD_LOG" 2>&1 9>&- &
    echo $! >"$DOCKERD_PID" )
  i=0
  until docker info >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -gt 120 ]; then tail -n 20 "$DOCKERD_LOG" >&2; die "dockerd did not answer within 60 s"; fi
    sleep 0.5
  done
  log "dockerd is up (pid $(cat "$DOCKERD_PID"))"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# The Debian mirror apt already uses (deb822 sources first, then the classic list).
debian_mirror() {
  m=$(sed -n 's/^URIs: *\([^ ]*\/debian\)\/\{0,1\}$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  [ -n "$m" ] || m=$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  [ -n "$m" ] || die "no Debian mirror found in apt's sources"
  printf '%s\n' "$m"
}

# Take an exclusive lock for building one image, so two concurrent runs do not build it twice.
# usage: build_lock IMAGE   (held until the calling shell exits)
build_lock() {
  lockfile=/var/tmp/tma-build-$(printf '%s' "$1" | tr '/:' '__').lock
  exec 9>"$lockfile"
  if command -v flock >/dev/null 2>&1; then
    flock -w 1800 9 || die "timed out waiting for $lockfile"
  fi
}

# debootstrap SUITE with extra packages into a fresh directory under $ROOTFS_BASE; print its path.
# usage: make_rootfs NAME SUITE "pkg1,pkg2,..."
make_rootfs() {
  need_pkgs "debootstrap" debootstrap
  mkdir -p "$ROOTFS_BASE"
  root=$(mktemp -d "$ROOTFS_BASE/$1.XXXXXX")
  mirror=$(debian_mirror)
  log "debootstrap $2 ($3) from $mirror into $root"
  if ! debootstrap --variant=minbase --include="$3" "$2" "$root" "$mirror" \
       >"$root.debootstrap.log" 2>&1; then
    tail -n 20 "$root.debootstrap.log" >&2
    remove_rootfs "$root"
    die "debootstrap failed (log $root.debootstrap.log)"
  fi
  rm -f "$root.debootstrap.log"
  printf '%s\n' "$root"
}

# Remove a scratch rootfs: unmount what debootstrap may have left mounted in it (proc, sys) first, and
# never cross into another file system.
remove_rootfs() {
  [ -n "${1:-}" ] && [ -d "$1" ] || return 0
  awk -v r="$1/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf --one-file-system "$1"
}

# Drop caches, docs and apt lists that an image does not need.
slim_rootfs() {
  rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/* \
         "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/info/* \
         "$1"/var/log/*.log "$1"/var/log/apt/* "$1"/var/cache/debconf/*-old
}

# Pack a rootfs into an image. usage: import_rootfs ROOT IMAGE [--change ...]...
import_rootfs() {
  root=$1; image=$2; shift 2
  tar --numeric-owner -C "$root" -c . | docker import "$@" - "$image" >/dev/null \
    || die "docker import $image failed"
}

# Print a docker CLI that can build with BuildKit (needed for `RUN --mount=type=secret`).
# Docker 23+ CLIs need the buildx plugin for that; Debian 12's docker.io CLI (20.10) has BuildKit built in.
# This host has both: /usr/local/bin/docker 28.x (no buildx) first on PATH and /usr/bin/docker 20.10.
buildkit_docker() {
  for cli in docker /usr/bin/docker; do
    command -v "$cli" >/dev/null 2>&1 || continue
    if "$cli" buildx version >/dev/null 2>&1; then printf '%s\n' "$cli"; return 0; fi
    major=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
    case $major in ''|*[!0-9]*) continue ;; esac
    if [ "$major" -lt 23 ]; then printf '%s\n' "$cli"; return 0; fi
  done
  die "no docker CLI here can build with BuildKit (install docker.io's CLI or the buildx plugin)"
}

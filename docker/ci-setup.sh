#!/bin/sh
# CI set-up for the Docker tests (tests/test_compose.py and the docker-mode tests), from a machine with
# nothing installed, and cheap to run again:
#   1. apt: docker.io, docker-compose, debootstrap (one `apt-get update` only when something is missing);
#   2. starts dockerd when no engine answers (log /var/tmp/tma-dockerd.log, pid /var/tmp/tma-dockerd.pid);
#   3. builds the images the tests need, in parallel, reusing those that exist:
#      tma-local/postgres:15 (bookworm), :17 (trixie), :18 (sid: the major TMA Cloud runs, postgres:18-alpine),
#      tma-local/redis:7 (debootstrap + docker import), and
#      tma-local/tma-backup-worker:latest (its base once: Debian 13 with the client tools of PG_CLIENT_MAJOR,
#      docker/images/common.sh, from sid for 18; then the Dockerfile through the build cache, so it
#      follows the working tree: a few seconds when nothing changed).
# Never reads stdin, never prompts (fine with CI=true). Prints the time of every step. Needs root.
# Usage: docker/ci-setup.sh        (FORCE=1 rebuilds the debootstrapped images; SKIP_WORKER=1 skips step 3's worker)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
LOG_TAG=ci-setup
. "$HERE/images/common.sh"
exec </dev/null
export DEBIAN_FRONTEND=noninteractive

t0=$(date +%s)
step_start=$t0
done_step() {
  now=$(date +%s)
  log "$1: $(( now - step_start )) s"
  step_start=$now
}

# 1. packages
missing=
command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 || missing="$missing docker.io"
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
command -v flock >/dev/null 2>&1 || missing="$missing util-linux"
if [ -n "$missing" ]; then
  [ "$(id -u)" = 0 ] || die "installing$missing needs root"
  log "installing$missing"
  apt-get update -q >/dev/null || die "apt-get update failed"
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $missing >/dev/null || die "apt-get install$missing failed"
fi
done_step "packages"

# 2. the engine
ensure_engine
log "engine: $(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}')"
done_step "engine"

# 3. images, in parallel (each build script locks its image, so a concurrent run waits instead of
# building twice); each one's output goes to its own log, shown when it fails.
logs=$(mktemp -d /var/tmp/tma-ci-setup.XXXXXX)
trap 'rm -rf "$logs"' EXIT
expected=
build_pids=
# A build that has not finished after this long is stopped and reported (a stalled mirror or pip must
# fail CI with a message, never hang it). A cold build takes about 4 min here (2 cores, other work beside it).
BUILD_TIMEOUT=${BUILD_TIMEOUT:-1200}
start_build() {  # NAME SCRIPT [ARG]
  name=$1; shift
  expected="$expected $name"
  (
    s=$(date +%s)
    if timeout --kill-after=30 "$BUILD_TIMEOUT" "$@" >"$logs/$name.log" 2>&1; then rc=0; else rc=$?; fi
    [ "$rc" != 124 ] || echo "timed out after $BUILD_TIMEOUT s" >>"$logs/$name.log"
    echo "$rc $(( $(date +%s) - s ))" >"$logs/$name.rc"
  ) &
  build_pids="$build_pids $!"
}
start_build postgres-15 "$HERE/images/postgres/build.sh" 15
start_build postgres-17 "$HERE/images/postgres/build.sh" 17
start_build postgres-18 "$HERE/images/postgres/build.sh" 18
start_build redis "$HERE/images/redis/build.sh"
[ "${SKIP_WORKER:-0}" = 1 ] || start_build worker "$HERE/images/worker/build.sh"
# only the builds: a bare `wait` would also wait for any other child of this shell
# shellcheck disable=SC2086
wait $build_pids
failed=
for name in $expected; do
  rc=1 seconds=?
  [ -r "$logs/$name.rc" ] && read -r rc seconds <"$logs/$name.rc"
  what=$(grep -E 'exists|built|reusing' "$logs/$name.log" | tail -n 1 | sed 's/^\[[^]]*\] //')
  if [ "$rc" = 0 ]; then
    log "image $name: ${seconds} s (${what:-done})"
  else
    tail -n 40 "$logs/$name.log" >&2
    log "image $name FAILED after ${seconds} s (log above)"
    failed="$failed $name"
  fi
done
[ -z "$failed" ] || die "image builds failed:$failed"
done_step "images"

docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^tma-local/' | sed 's/^/  /' >&2
log "ready in $(( $(date +%s) - t0 )) s"

#!/bin/sh
# Bring the tma-backup stack (docker-compose.yml) up on this machine's Docker engine, from nothing if
# need be, and safely again and again:
#   1. installs docker.io, debootstrap and docker-compose if missing, starts dockerd if none answers;
#   2. builds the images that are missing (tma-local/postgres:15, tma-local/redis:7,
#      tma-local/python-base:bookworm) and reuses the ones that exist; the worker image is rebuilt
#      from the working tree through the build cache (seconds when nothing changed;
#      SKIP_IF_EXISTS=1 reuses it as it is);
#   3. creates .env from .env.example with random passwords when there is none (never overwrites);
#   4. `docker-compose up -d` and waits until postgres and redis are healthy and the others run.
# Never reads stdin (fine with CI=true). Logs to stderr. Options: --build-only (steps 1-2 only).
# Stop with: docker-compose down   (add -v to delete the database, broker and backup volumes)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
LOG_TAG=up
. "$HERE/images/common.sh"

build_only=0
for arg in "$@"; do
  case $arg in
    --build-only) build_only=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown option $arg (try --help)" ;;
  esac
done
exec </dev/null

t0=$(date +%s)
need_pkgs "debootstrap" debootstrap
ensure_engine
for step in "postgres/build.sh 15" "redis/build.sh" "worker/build.sh"; do
  set -- $step
  s=$(date +%s)
  log "images: $step"
  "$HERE/images/$1" ${2:+"$2"}
  log "images: $step done in $(( $(date +%s) - s )) s"
done
if [ $build_only = 1 ]; then
  log "images ready in $(( $(date +%s) - t0 )) s (--build-only: no containers started)"
  exit 0
fi

need_pkgs "docker-compose" docker-compose
cd "$REPO"
if [ ! -e .env ]; then
  [ -r .env.example ] || die ".env and .env.example are both missing in $REPO"
  log "no .env: creating it from .env.example with random DB_PASSWORD and FLOWER_PASSWORD (mode 600)"
  umask 077
  rand() { od -An -N18 -tx1 /dev/urandom | tr -d ' \n'; }
  sed -e "s/^DB_PASSWORD=.*/DB_PASSWORD=$(rand)/" -e "s/^FLOWER_PASSWORD=.*/FLOWER_PASSWORD=$(rand)/" \
    .env.example >.env.tmp && mv .env.tmp .env
  umask 022
fi

log "docker-compose config"
docker-compose config -q || die "docker-compose.yml does not validate (see above)"
log "docker-compose up -d"
docker-compose up -d --no-build >&2 || die "docker-compose up failed"

# wait for health (postgres, redis) and for the others to be running
deadline=$(( $(date +%s) + ${UP_TIMEOUT:-120} ))
for svc in postgres redis worker beat flower; do
  while :; do
    id=$(docker-compose ps -q "$svc")
    state=$( [ -n "$id" ] && docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id" || echo missing)
    case $state in
      "running healthy"|"running ") break ;;
      exited*|dead*|missing) docker-compose logs --tail=30 "$svc" >&2; die "$svc is $state" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || { docker-compose logs --tail=30 "$svc" >&2; die "$svc still '$state' after ${UP_TIMEOUT:-120} s"; }
    sleep 1
  done
  log "$svc: $state"
done
# a Celery process that dies on start (bad settings, import error) shows as running for a moment
sleep "${UP_SETTLE:-5}"
for svc in worker beat flower; do
  id=$(docker-compose ps -q "$svc")
  set -- $(docker inspect -f '{{.State.Status}} {{.RestartCount}}' "$id")
  if [ "$1" != running ] || [ "$2" != 0 ]; then
    docker-compose logs --tail=30 "$svc" >&2
    die "$svc is $1 after $2 restarts"
  fi
done
docker-compose ps >&2
log "stack up in $(( $(date +%s) - t0 )) s; Flower: http://127.0.0.1:5555; broker for the host CLI: redis://$(docker-compose port redis 6379)/0"

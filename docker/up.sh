#!/bin/sh
# Bring the tma-backup stack (docker-compose.yml) up on this machine's Docker engine, from nothing if
# need be, and safely again and again:
#   1. installs docker.io, debootstrap and docker-compose if missing, starts dockerd if none answers;
#   2. builds the images that are missing (tma-local/postgres:15, tma-local/redis:7, the worker image's
#      base tma-local/worker-base:latest with PostgreSQL 18's client tools: PG_CLIENT_MAJOR in
#      docker/images/common.sh) and reuses the ones that exist; the worker image is rebuilt
#      from the working tree through the build cache (seconds when nothing changed;
#      SKIP_IF_EXISTS=1 reuses it as it is);
#   3. creates the env file (.env) from .env.example with random passwords (DB_PASSWORD,
#      FLOWER_PASSWORD, REDIS_PASSWORD, BACKUP_REPOSITORY_PASSWORD) when there is none (never overwrites);
#      an existing one without REDIS_PASSWORD or BACKUP_REPOSITORY_PASSWORD(_FILE) gets a random one
#      appended, and says so (keep a copy of the repository's password off this host: without it no set
#      can be read). Signed task messages, likewise: the task-signing key (0600), its certificate and a
#      cert store, as `tma-backup keys init` makes them, in task-signing/ beside the env file (made once,
#      never overwritten; kept and reused when they are there), and the three TASK_SIGNING_* settings
#      naming them, written into a new env file or appended to one without them (saying so). Made with
#      the worker image when Docker has it, else this machine's tma-backup (the repository's .venv or
#      PATH), else openssl (UP_SIGNING_TOOL=worker-image|tma-backup|openssl chooses);
#   4. `docker-compose up -d` and waits until postgres and redis are healthy, the others run, and the worker
#      answers the broker (a command sent right after up.sh then finds it);
#   5. the off-site repository: creates the default one (/repository, the stack's own volume) once, when
#      that volume is empty; any other BACKUP_REPOSITORY must already exist (the operator creates it once,
#      deliberately: docker-compose exec worker tma-backup repository init). Fails when the worker cannot
#      read it (wrong password, unreachable, missing).
# Joining a running TMA Cloud stack (docker-compose.tma.yml: TMA's tma-cloud-postgres, network, .env and
# uploads/ instead of a database of our own): --join TMA_DIR, or TMA_DIR in the env file. up.sh checks
# that tma-cloud-postgres runs and that the worker image's pg_dump is not older than its server (the
# worker reaches it over TMA's network with its own client tools, DB_MODE=host: no Docker socket), finds
# TMA's network (TMA_NETWORK), and writes TMA_DIR, TMA_NETWORK and COMPOSE_FILE into the env file when they
# are missing, so that plain `docker-compose …` in the project folder uses both files from then on.
# --docker-mode (or a COMPOSE_FILE naming docker-compose.docker-mode.yml) runs pg_dump inside
# tma-cloud-postgres instead, at a cost: the worker gets the Docker socket, root on this host; up.sh then
# finds the socket's group (DOCKER_GID) too and writes it, and a COMPOSE_FILE naming all three files.
# Never reads stdin (fine with CI=true). Logs to stderr. Options:
#   --build-only             steps 1-2 only
#   --env-only               step 3 only (no Docker needed: the key is made without it when need be)
#   --project-directory DIR  where the env file and relative paths live (default: the repository)
#   --env-file FILE          the settings (default: DIR/.env)
#   -p, --project-name NAME  docker-compose's project name (default: COMPOSE_PROJECT_NAME from the env file)
#   --join TMA_DIR           back up the TMA Cloud whose docker-compose stack runs from TMA_DIR
#   --docker-mode            joined: pg_dump/pg_restore inside tma-cloud-postgres, through the Docker socket
# Host ports: REDIS_HOST_PORT (default 56379), FLOWER_HOST_PORT (default 5555), from the environment.
# TMA_UPLOADS_MODE=rw (environment) mounts the uploads writable, for a restore with uploads.
# Stop with: docker-compose down   (add -v to delete the database, broker, backup AND repository volumes;
# pass the same --project-directory/--env-file/-p as here; with --join, TMA Cloud's stack is not touched)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
LOG_TAG=up
. "$HERE/images/common.sh"

build_only=0
env_only=0
project_dir=$REPO
env_file=
project_name=
join_dir=
docker_mode=0
while [ $# -gt 0 ]; do
  case $1 in
    --build-only) build_only=1 ;;
    --env-only) env_only=1 ;;
    --project-directory) [ $# -ge 2 ] || die "$1 needs a folder"; project_dir=$2; shift ;;
    --env-file) [ $# -ge 2 ] || die "$1 needs a file"; env_file=$2; shift ;;
    -p|--project-name) [ $# -ge 2 ] || die "$1 needs a name"; project_name=$2; shift ;;
    --join) [ $# -ge 2 ] || die "$1 needs TMA Cloud's folder"; join_dir=$2; shift ;;
    --docker-mode) docker_mode=1 ;;
    -h|--help) sed -n '2,46p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown option $1 (try --help)" ;;
  esac
  shift
done
exec </dev/null
project_dir=$(cd "$project_dir" && pwd) || die "no folder $project_dir"
env_file=${env_file:-$project_dir/.env}
case $env_file in /*) ;; *) env_file=$(pwd)/$env_file ;; esac
export TMA_ENV_FILE="$env_file"   # the containers' env_file (docker-compose.yml)
# docker-compose with this stack's file(s), folder, settings and name, whatever the current folder
# (joined: docker-compose.tma.yml too, once `join` below has decided)
compose_files="-f $REPO/docker-compose.yml"
dc() {
  # shellcheck disable=SC2086  # the repository's path has no spaces (checked below)
  docker-compose $compose_files --project-directory "$project_dir" --env-file "$env_file" \
    ${project_name:+-p "$project_name"} "$@"
}
case $REPO in *[[:space:]]*) die "the repository's path ($REPO) must not contain spaces" ;; esac

# The env file: created from .env.example with random passwords when missing (never overwritten); one
# without REDIS_PASSWORD or BACKUP_REPOSITORY_PASSWORD(_FILE) gets a random one appended. Random values
# are hex: safe in a URL and in Redis's configuration.
rand() { od -An -N18 -tx1 /dev/urandom | tr -d ' \n'; }
# append KEY=VALUE, completing a last line that lacks its newline first (the file keeps its mode)
append_setting() {
  { [ -z "$(tail -c1 "$env_file")" ] || echo; printf '%s=%s\n' "$1" "$2"; } >>"$env_file" ||
    die "cannot append $1 to $env_file"
}
keep_elsewhere() {
  log "****************************************************************************************************"
  log "* BACKUP_REPOSITORY_PASSWORD in $env_file is new: KEEP A COPY OF IT AWAY FROM THIS HOST (a password"
  log "* manager, a safe). Every set in the repository is encrypted with it: without it, no set can ever be"
  log "* read, and the night you need the repository is the night this host and its .env are gone."
  log "****************************************************************************************************"
}
prepare_env_file() {
  if [ ! -e "$env_file" ]; then
    [ -r "$REPO/.env.example" ] || die "$env_file and $REPO/.env.example are both missing"
    signing_files   # made (or found) first: the new file names them
    log "no $env_file: creating it from .env.example with random DB_PASSWORD, FLOWER_PASSWORD, REDIS_PASSWORD and BACKUP_REPOSITORY_PASSWORD and TASK_SIGNING_* naming the key in $signing_dir (mode 600)"
    (
      umask 077
      sed -e "s/^DB_PASSWORD=.*/DB_PASSWORD=$(rand)/" -e "s/^FLOWER_PASSWORD=.*/FLOWER_PASSWORD=$(rand)/" \
        -e "s/^REDIS_PASSWORD=.*/REDIS_PASSWORD=$(rand)/" \
        -e "s/^BACKUP_REPOSITORY_PASSWORD=.*/BACKUP_REPOSITORY_PASSWORD=$(rand)/" \
        -e "s|^#\{0,1\}TASK_SIGNING_KEY=.*|TASK_SIGNING_KEY=$(sed_escape "$signing_dir/$SIGNING_KEY")|" \
        -e "s|^#\{0,1\}TASK_SIGNING_CERT=.*|TASK_SIGNING_CERT=$(sed_escape "$signing_dir/$SIGNING_CERT")|" \
        -e "s|^#\{0,1\}TASK_SIGNING_CERT_STORE=.*|TASK_SIGNING_CERT_STORE=$(sed_escape "$signing_dir/$SIGNING_STORE")|" \
        "$REPO/.env.example" >"$env_file.tmp" &&
        mv "$env_file.tmp" "$env_file"
    ) || die "cannot create $env_file"
    grep -q '^BACKUP_REPOSITORY_PASSWORD=' "$env_file" && keep_elsewhere
  fi
  if ! grep -q '^REDIS_PASSWORD=' "$env_file"; then
    log "$env_file has no REDIS_PASSWORD: appending a random one (the stack's Redis now requires a password; clients outside the stack need it in CELERY_BROKER_URL: redis://:REDIS_PASSWORD@host:port/0)"
    append_setting REDIS_PASSWORD "$(rand)"
  fi
  # The repository's password: BACKUP_REPOSITORY_PASSWORD, or a file named by BACKUP_REPOSITORY_PASSWORD_FILE
  # (one of them, never both). A new one only when neither is there: a repository that exists keeps its own.
  if ! grep -q '^BACKUP_REPOSITORY_PASSWORD\(_FILE\)\{0,1\}=' "$env_file"; then
    log "$env_file has no BACKUP_REPOSITORY_PASSWORD: appending a random one (the password of the off-site restic repository; an existing repository keeps its own: put that one in $env_file instead)"
    append_setting BACKUP_REPOSITORY_PASSWORD "$(rand)"
    keep_elsewhere
  fi
  repository_password=$(sed -n 's/^BACKUP_REPOSITORY_PASSWORD=//p' "$env_file" | tail -n1)
  if grep -q '^BACKUP_REPOSITORY_PASSWORD=' "$env_file"; then
    case $repository_password in
      "") grep -q '^BACKUP_REPOSITORY_PASSWORD_FILE=.' "$env_file" ||
            die "BACKUP_REPOSITORY_PASSWORD in $env_file is empty: set the repository's password, or delete the line to get a random one (only for a repository not created yet)" ;;
      change-me) log "WARNING: BACKUP_REPOSITORY_PASSWORD in $env_file is still .env.example's 'change-me': set a random one before the repository is created (it cannot be changed by editing .env afterwards)" ;;
    esac
  fi
  redis_password=$(sed -n 's/^REDIS_PASSWORD=//p' "$env_file" | tail -n1)
  case $redis_password in
    "") die "REDIS_PASSWORD in $env_file is empty: set one (letters, digits and - . _ ~), or delete the line to get a random one" ;;
    *[!A-Za-z0-9._~-]*) die "REDIS_PASSWORD in $env_file: use letters, digits and - . _ ~ only (it goes into a URL and Redis's configuration)" ;;
    change-me) log "WARNING: REDIS_PASSWORD in $env_file is still .env.example's 'change-me': set a random one" ;;
  esac
  prepare_signing
}

# Signed task messages (README, "Signed task messages"): every worker, beat and Flower of the stack signs
# what it sends and accepts only what a certificate in its store signed, so that whoever can write to
# Redis cannot send a task. The key, its certificate and a cert store holding it are made once, as
# `tma-backup keys init` makes them, in task-signing/ beside the env file; the env file's TASK_SIGNING_*
# name them with host paths (a CLI on this host signs with them too), and the stack's one-shot
# task-signing service copies them for its containers' uid 1000 (docker-compose.yml). Never overwritten.
SIGNING_KEY=task-signing.key
SIGNING_CERT=task-signing.crt
SIGNING_STORE=cert-store
WORKER_IMAGE=tma-local/tma-backup-worker:latest
sed_escape() { printf '%s' "$1" | sed 's/[|&\\]/\\&/g'; }
# a path that goes into the env file and into the compose file's volume specs as it is
check_signing_path() {
  case $2 in
    /*) ;;
    *) die "$1=$2 in $env_file: must be an absolute path (the stack mounts it)" ;;
  esac
  case $2 in
    *[[:space:][:cntrl:]:#\$\\\"\']*) die "$1: $2 holds a space, ':', '#', '\$', a quote or a backslash, which the env file or a volume spec would misread: move the env file (task-signing/ is made beside it) or set the three TASK_SIGNING_* yourself" ;;
  esac
}
# $signing_dir holding the key, the certificate and the store: found there, or made now; never one of them
# alone, never over an existing one.
signing_files() {
  signing_dir=$(cd "$(dirname "$env_file")" 2>/dev/null && pwd)/task-signing || die "no folder for $env_file"
  check_signing_path "task-signing/ beside $env_file" "$signing_dir"
  found=
  for name in $SIGNING_KEY $SIGNING_CERT $SIGNING_STORE; do
    [ ! -e "$signing_dir/$name" ] && [ ! -L "$signing_dir/$name" ] || found="$found $name"
  done
  case $found in
    " $SIGNING_KEY $SIGNING_CERT $SIGNING_STORE")
      [ -f "$signing_dir/$SIGNING_KEY" ] && [ -f "$signing_dir/$SIGNING_CERT" ] && [ -d "$signing_dir/$SIGNING_STORE" ] ||
        die "$signing_dir: $SIGNING_KEY, $SIGNING_CERT and $SIGNING_STORE/ are there but not two files and a folder: refusing to use or overwrite them; move them away"
      signing_made="the key already in $signing_dir, kept as it is"
      return ;;
    "") ;;
    *) die "$signing_dir holds${found} but not all of $SIGNING_KEY, $SIGNING_CERT and $SIGNING_STORE/: refusing to overwrite or complete them; move them away (or set the three TASK_SIGNING_* in $env_file yourself)" ;;
  esac
  (umask 077; mkdir -p "$signing_dir") || die "cannot create $signing_dir"
  tool=${UP_SIGNING_TOOL:-}
  if [ -z "$tool" ]; then
    if docker image inspect "$WORKER_IMAGE" >/dev/null 2>&1; then tool=worker-image
    elif [ -x "$REPO/.venv/bin/tma-backup" ] || command -v tma-backup >/dev/null 2>&1; then tool=tma-backup
    elif command -v openssl >/dev/null 2>&1; then tool=openssl
    else die "cannot make the task-signing key: no Docker with the worker image (docker/up.sh --build-only builds it), no tma-backup and no openssl on this machine"
    fi
  fi
  case $tool in
    worker-image|tma-backup|openssl) ;;
    *) die "UP_SIGNING_TOOL=$tool: use worker-image, tma-backup or openssl" ;;
  esac
  made=$(make_signing_keys_with_$(printf '%s' "$tool" | tr - _) 2>&1 </dev/null) || {
    printf '%s\n' "$made" >&2
    # none of the three was there before: nothing half made stays (a later run would refuse it)
    rm -rf "$signing_dir/$SIGNING_KEY" "$signing_dir/$SIGNING_CERT" "$signing_dir/$SIGNING_STORE"
    die "could not make the task-signing key in $signing_dir with $tool (above)"
  }
  [ -f "$signing_dir/$SIGNING_KEY" ] && [ -f "$signing_dir/$SIGNING_CERT" ] && [ -d "$signing_dir/$SIGNING_STORE" ] ||
    die "$tool made no key, certificate and cert store in $signing_dir"
  signing_made="a new key made in $signing_dir with $tool (mode 0600: whoever reads it can send any task)"
  log "task-signing: $signing_made; its certificate is valid for 10 years"
}
# `tma-backup keys init` in the worker image, as this user (the files are this user's, as if made here)
make_signing_keys_with_worker_image() {
  docker run --rm --network none --user "$(id -u):$(id -g)" --hostname "$(uname -n | cut -c1-63)" \
    -v "$signing_dir:/task-signing" "$WORKER_IMAGE" tma-backup keys init --dir /task-signing
}
make_signing_keys_with_tma_backup() {
  cli=$REPO/.venv/bin/tma-backup
  [ -x "$cli" ] || cli=$(command -v tma-backup) || { echo "no tma-backup on this machine"; return 1; }
  (cd "$signing_dir" && "$cli" keys init --dir "$signing_dir")
}
# What `keys init` makes, with openssl alone: an RSA 3072 key (PKCS#8, 0600), a self-signed certificate
# (SHA-256, a random serial, not a CA, digital signature only, 3650 days), a cert store holding it under
# its fingerprint's name. Each file is made under a temporary name and renamed last, the key last of all.
make_signing_keys_with_openssl() {
  command -v openssl >/dev/null 2>&1 || { echo "no openssl on this machine"; return 1; }
  config=$signing_dir/.openssl.cnf
  printf '%s\n' "[req]" "distinguished_name = dn" "x509_extensions = ext" "prompt = no" "[dn]" \
    "CN = tma-backup task signing $(uname -n | cut -c1-20) $(date -u +%Y-%m-%d)" "[ext]" \
    "basicConstraints = critical,CA:FALSE" "keyUsage = critical,digitalSignature" >"$config" || return 1
  (umask 077 && openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out "$signing_dir/.key.new") &&
    openssl req -new -x509 -config "$config" -key "$signing_dir/.key.new" -sha256 -days 3650 \
      -out "$signing_dir/.crt.new" &&
    fingerprint=$(openssl x509 -in "$signing_dir/.crt.new" -noout -fingerprint -sha256 |
      sed 's/^.*=//; s/://g' | tr 'A-F' 'a-f' | cut -c1-16) &&
    [ ${#fingerprint} = 16 ] &&
    chmod 644 "$signing_dir/.crt.new" &&
    mkdir -m 755 "$signing_dir/.store.new" &&
    cp "$signing_dir/.crt.new" "$signing_dir/.store.new/tma-backup-$fingerprint.crt" &&
    mv "$signing_dir/.store.new" "$signing_dir/$SIGNING_STORE" &&
    mv "$signing_dir/.crt.new" "$signing_dir/$SIGNING_CERT" &&
    chmod 600 "$signing_dir/.key.new" &&
    mv "$signing_dir/.key.new" "$signing_dir/$SIGNING_KEY"
  status=$?
  rm -rf "$config" "$signing_dir/.key.new" "$signing_dir/.crt.new" "$signing_dir/.store.new"
  return $status
}
# The env file's TASK_SIGNING_*: all three (each naming what it must), or none (then made or found in
# task-signing/ beside it, and appended, saying so); never some of them.
prepare_signing() {
  given=
  for key in TASK_SIGNING_KEY TASK_SIGNING_CERT TASK_SIGNING_CERT_STORE; do
    [ -z "$(env_value $key)" ] || given="$given $key"
  done
  case $given in
    " TASK_SIGNING_KEY TASK_SIGNING_CERT TASK_SIGNING_CERT_STORE") ;;
    "")
      signing_files
      log "$env_file has no TASK_SIGNING_KEY, TASK_SIGNING_CERT and TASK_SIGNING_CERT_STORE: appending the three for $signing_made (signed task messages: the stack's workers now accept only tasks signed with it; a CLI outside the stack needs the same three settings)"
      append_setting TASK_SIGNING_KEY "$signing_dir/$SIGNING_KEY"
      append_setting TASK_SIGNING_CERT "$signing_dir/$SIGNING_CERT"
      append_setting TASK_SIGNING_CERT_STORE "$signing_dir/$SIGNING_STORE" ;;
    *) die "$env_file sets${given} but not all three of TASK_SIGNING_KEY, TASK_SIGNING_CERT and TASK_SIGNING_CERT_STORE: set all three, or delete them to have a key made in task-signing/ beside it" ;;
  esac
  for key in TASK_SIGNING_KEY TASK_SIGNING_CERT TASK_SIGNING_CERT_STORE; do
    value=$(env_value $key)
    check_signing_path "$key" "$value"
    case $key in
      *_STORE) [ -d "$value" ] || die "$key in $env_file names $value, which is not a folder: the cert store (delete the three TASK_SIGNING_* lines to have a new key made)"
        [ -n "$(ls "$value")" ] || die "$key in $env_file names $value, which holds no certificate: copy TASK_SIGNING_CERT into it" ;;
      *) [ -f "$value" ] || die "$key in $env_file names $value, which is not a file (delete the three TASK_SIGNING_* lines to have a new key made)" ;;
    esac
  done
}
# A setting's value in the env file (the last one wins, as for docker-compose), or empty.
env_value() { sed -n "s/^$1=//p" "$env_file" | tail -n1; }

# Joining TMA Cloud's own stack (docker-compose.tma.yml): TMA_DIR from --join or the env file. Checks what
# the override needs, finds TMA_NETWORK when it is not set, exports the settings for docker-compose and
# writes the missing ones into the env file (with COMPOSE_FILE), saying so. DB_MODE=host: the worker image's
# pg_dump must not be older than the server (checked here, and by the worker at every backup). Docker mode
# only when asked for (--docker-mode, or a COMPOSE_FILE that names its file): then DOCKER_GID too.
DOCKER_MODE_FILE=$REPO/docker-compose.docker-mode.yml
# The major of PostgreSQL's `--version` line ("pg_dump (PostgreSQL) 18.6 (Debian 18.6-3)"), or nothing.
pg_major_of() { sed -n 's/.*(PostgreSQL) \([0-9][0-9]*\).*/\1/p' | head -n1; }
join() {
  [ -n "$join_dir" ] || join_dir=$(env_value TMA_DIR)
  if [ -z "$join_dir" ]; then
    [ "$docker_mode" = 0 ] || die "--docker-mode is for joining TMA Cloud's stack: add --join TMA_DIR"
    return 0
  fi
  join_dir=$(cd "$join_dir" 2>/dev/null && pwd) || die "--join/TMA_DIR: no folder $join_dir (TMA Cloud's folder: its docker-compose.yml, .env and uploads/)"
  case $join_dir in *[[:space:]:]*) die "TMA_DIR ($join_dir) must not contain spaces or ':' (it goes into volume specs)" ;; esac
  [ -f "$join_dir/.env" ] || die "TMA_DIR: $join_dir/.env is missing: TMA Cloud's settings file (its DB_PASSWORD, FILE_ENCRYPTION_KEY, …)"
  [ -d "$join_dir/uploads" ] || die "TMA_DIR: $join_dir/uploads is missing: TMA Cloud's uploads folder (STORAGE_DRIVER=local; create it empty for s3)"
  status=$(docker inspect -f '{{.State.Status}}' tma-cloud-postgres 2>/dev/null) ||
    die "no container tma-cloud-postgres: start TMA Cloud's stack first (docker compose up -d in $join_dir)"
  [ "$status" = running ] || die "tma-cloud-postgres is $status: start TMA Cloud's stack first (docker compose up -d in $join_dir)"
  networks=$(docker inspect -f '{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}' tma-cloud-postgres)
  network=${TMA_NETWORK:-$(env_value TMA_NETWORK)}
  if [ -z "$network" ]; then
    for candidate in $networks; do
      case $candidate in *tma-cloud-network) network=${network:+$network }$candidate ;; esac
    done
    [ -n "$network" ] || { set -- $networks; [ $# = 1 ] && network=$1; }
    case $network in
      "") die "tma-cloud-postgres is on networks '$networks', none of them TMA Cloud's …_tma-cloud-network: set TMA_NETWORK in $env_file" ;;
      *" "*) die "tma-cloud-postgres is on several TMA Cloud networks ($network): set TMA_NETWORK in $env_file" ;;
    esac
  fi
  case " $networks " in *" $network "*) ;; *) die "TMA_NETWORK=$network: tma-cloud-postgres is not on it (it is on: $networks)" ;; esac
  compose_setting=$(env_value COMPOSE_FILE)
  case $compose_setting in
    *docker-compose.docker-mode.yml*) docker_mode=1 ;;
    ?*) [ "$docker_mode" = 0 ] ||
          die "--docker-mode: COMPOSE_FILE in $env_file ($compose_setting) does not name docker-compose.docker-mode.yml: add :$DOCKER_MODE_FILE to it, or leave --docker-mode out" ;;
  esac
  export TMA_DIR="$join_dir" TMA_NETWORK="$network"
  if [ "$docker_mode" = 1 ]; then
    gid=${DOCKER_GID:-$(env_value DOCKER_GID)}
    if [ -z "$gid" ]; then
      [ -S /var/run/docker.sock ] || die "no Docker socket at /var/run/docker.sock: docker mode runs pg_dump inside tma-cloud-postgres through it (leave --docker-mode out: the worker's own tools need no socket)"
      gid=$(stat -c %g /var/run/docker.sock)
    fi
    export DOCKER_GID="$gid"
    pairs="TMA_DIR=$join_dir TMA_NETWORK=$network DOCKER_GID=$gid COMPOSE_FILE=$REPO/docker-compose.yml:$REPO/docker-compose.tma.yml:$DOCKER_MODE_FILE"
    mode="docker mode: pg_dump inside tma-cloud-postgres; the worker holds the Docker socket, root on this host"
  else
    # The worker's own tools against TMA's server, checked now rather than at 02:00: the image runs the
    # server's own major's (it has those of PG_CLIENT_MAJORS, the newest first on PATH). A newer server
    # cannot be dumped; an older one without its own major's tools would be dumped by a newer pg_dump,
    # whose archives restore only into servers of that newer major or newer, never into this one.
    client=$(docker run --rm --network none --entrypoint pg_dump "$WORKER_IMAGE" --version 2>&1 | pg_major_of)
    carried=$(docker run --rm --network none --entrypoint ls "$WORKER_IMAGE" /usr/lib/postgresql 2>/dev/null | tr '\n' ' ')
    server=$(docker exec tma-cloud-postgres postgres --version 2>/dev/null | pg_major_of)
    [ -n "$client" ] || die "cannot read the version of pg_dump in $WORKER_IMAGE: rebuild it (docker/images/worker/build.sh)"
    ways_out="add $server to PG_CLIENT_MAJORS in docker/images/common.sh (and its Debian suite to pg_suite) and run up.sh again (it rebuilds the image), or join in docker mode (--docker-mode: the worker then holds the Docker socket, root on this host)"
    if [ -z "$server" ]; then
      log "WARNING: cannot read tma-cloud-postgres's PostgreSQL version (postgres --version in it): the worker checks it at every backup"
    elif [ "$server" -gt "$client" ]; then
      die "tma-cloud-postgres runs PostgreSQL $server and the worker image's pg_dump is $client's, which cannot dump a newer server: $ways_out"
    else
      case " $carried " in
        *" $server "*) ;;
        *) die "tma-cloud-postgres runs PostgreSQL $server and the worker image has no client tools of that major (it has ${carried% }): pg_dump $client would dump it, but its archives restore only into PostgreSQL $client or newer, never into this server: $ways_out" ;;
      esac
    fi
    [ -z "$(env_value DOCKER_GID)" ] ||
      log "$env_file has DOCKER_GID: no longer used (the joined worker reaches tma-cloud-postgres with its own PostgreSQL ${server:-$client} tools, without the Docker socket); delete the line, or add --docker-mode to keep docker mode"
    pairs="TMA_DIR=$join_dir TMA_NETWORK=$network COMPOSE_FILE=$REPO/docker-compose.yml:$REPO/docker-compose.tma.yml"
    mode="host mode: the worker's own PostgreSQL ${server:-$client} tools over TMA's network, no Docker socket; server PostgreSQL ${server:-?}"
  fi
  for pair in $pairs; do
    key=${pair%%=*}
    if ! grep -q "^$key=" "$env_file"; then
      log "$env_file has no $key: appending $pair"
      append_setting "$key" "${pair#*=}"
    fi
  done
  compose_files="$compose_files -f $REPO/docker-compose.tma.yml"
  [ "$docker_mode" = 0 ] || compose_files="$compose_files -f $DOCKER_MODE_FILE"
  log "joining TMA Cloud's stack: database tma-cloud-postgres ($mode), network $network, settings $join_dir/.env, uploads $join_dir/uploads (${TMA_UPLOADS_MODE:-ro})"
}

if [ $env_only = 1 ]; then
  prepare_env_file
  log "$env_file ready (--env-only: nothing built or started)"
  exit 0
fi

t0=$(date +%s)
need_pkgs "debootstrap" debootstrap
ensure_engine
# joined, this stack's postgres never runs: its image is not needed
steps="redis/build.sh worker/build.sh"
[ -n "$join_dir" ] || [ -n "$(sed -n 's/^TMA_DIR=//p' "$env_file" 2>/dev/null | tail -n1)" ] || steps="postgres/build.sh:15 $steps"
for step in $steps; do
  step=$(printf '%s' "$step" | tr ':' ' ')
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
cd "$project_dir"
prepare_env_file
join
services="postgres redis worker beat flower"
fixed_names="tma-cloud-postgres tma-backup-beat"
if [ -n "$join_dir" ]; then
  services="redis worker beat flower"   # TMA Cloud's tma-cloud-postgres is the database
  fixed_names="tma-backup-beat"
fi

log "docker-compose config"
dc config -q || die "docker-compose.yml does not validate (see above)"
# fixed container names (tma-cloud-postgres, tma-backup-beat) may belong to something else: say so clearly
ours=$(dc ps -q 2>/dev/null || true)
for name in $fixed_names; do
  id=$(docker inspect -f '{{.Id}}' "$name" 2>/dev/null) || continue
  if ! printf '%s\n' "$ours" | grep -q "^$id"; then
    hint=
    [ "$name" != tma-cloud-postgres ] || hint=" (if it is TMA Cloud's own stack, join it instead of starting a database: --join TMA_DIR)"
    die "a container named $name exists outside this stack ($(docker inspect -f '{{.Config.Image}}, {{.State.Status}}' "$name")): remove it or stop its stack first$hint"
  fi
done
log "docker-compose up -d"
dc up -d --no-build >&2 || die "docker-compose up failed"

# wait for health (postgres, redis) and for the others to be running
deadline=$(( $(date +%s) + ${UP_TIMEOUT:-120} ))
for svc in $services; do
  while :; do
    id=$(dc ps -q "$svc")
    state=$( [ -n "$id" ] && docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id" || echo missing)
    case $state in
      "running healthy"|"running ") break ;;
      exited*|dead*|missing) dc logs --tail=30 "$svc" >&2; die "$svc is $state" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || { dc logs --tail=30 "$svc" >&2; die "$svc still '$state' after ${UP_TIMEOUT:-120} s"; }
    sleep 1
  done
  log "$svc: $state"
done
# a Celery process that dies on start (bad settings, import error) shows as running for a moment
sleep "${UP_SETTLE:-5}"
for svc in worker beat flower; do
  id=$(dc ps -q "$svc")
  set -- $(docker inspect -f '{{.State.Status}} {{.RestartCount}}' "$id")
  if [ "$1" != running ] || [ "$2" != 0 ]; then
    dc logs --tail=30 "$svc" >&2
    die "$svc is $1 after $2 restarts"
  fi
done
# the worker answers the broker (a command sent now would otherwise find no worker yet)
until dc exec -T worker celery -A worker inspect ping >/dev/null 2>&1; do
  [ "$(date +%s)" -lt "$deadline" ] || { dc logs --tail=30 worker >&2; die "the worker does not answer the broker after ${UP_TIMEOUT:-120} s"; }
  sleep 1
done
log "worker: answers the broker"

# 5. The repository. Only the stack's own default (/repository, the empty `repository` volume) is created
# here: another address is created once by the operator, deliberately, because a typo in it or a wrong
# password must fail, never end with a new empty repository beside the real one. The address is not
# logged (it may carry user:password@); tma-backup's own lines redact it.
address=$(dc exec -T worker printenv BACKUP_REPOSITORY 2>/dev/null | tr -d '\r' || true)
if [ -z "$address" ]; then
  log "repository: BACKUP_REPOSITORY is empty: backups stay on this host only (README, \"The off-site repository\")"
elif listed=$(dc exec -T worker tma-backup repository list --json 2>&1); then
  log "repository: ready ($(printf '%s\n' "$listed" | grep -c '^{' || true) set(s) in it)"
else
  case $listed in
    *"no restic repository at"*)
      [ "$address" = /repository ] ||
        die "repository: $(printf '%s\n' "$listed" | grep '\[ERROR\]' | head -n1 | sed 's/^\[ERROR\] *//'). The stack is up, but every backup fails until it exists: create it once with: docker-compose exec worker tma-backup repository init"
      [ -z "$(dc exec -T worker find /repository -mindepth 1 -maxdepth 1 -print 2>/dev/null | head -n1)" ] ||
        die "repository: /repository (the stack's repository volume) is not empty but holds no restic repository; nothing was created. Look inside: docker-compose exec worker ls -la /repository"
      log "repository: creating the stack's default repository in the volume at /repository (once)"
      # `repository list` succeeding afterwards is the proof, whatever init printed
      created=$(dc exec -T worker tma-backup repository init 2>&1) || true
      if ! dc exec -T worker tma-backup repository list >/dev/null 2>&1; then
        printf '%s\n' "$created" >&2
        die "repository: could not create the default repository at /repository (see above)"
      fi
      volume=$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/repository"}}{{.Name}}{{end}}{{end}}' "$(dc ps -q worker)" || true)
      log "repository: created at /repository, in the volume ${volume:-repository} ON THIS HOST: a stand-in, not off site; point BACKUP_REPOSITORY at a bucket for that (README, \"The off-site repository\"). Its password is BACKUP_REPOSITORY_PASSWORD in $env_file: keep a copy away from this host"
      ;;
    *)
      printf '%s\n' "$listed" | grep '\[ERROR\]' >&2 || printf '%s\n' "$listed" | tail -n5 >&2
      die "repository: the worker cannot read BACKUP_REPOSITORY (above); the stack is up, but every backup fails until this is fixed"
      ;;
  esac
fi
dc ps >&2
log "stack up in $(( $(date +%s) - t0 )) s; Flower: http://$(dc port flower 5555); broker for the host CLI: redis://:REDIS_PASSWORD@$(dc port redis 6379)/0 (REDIS_PASSWORD from $env_file)"

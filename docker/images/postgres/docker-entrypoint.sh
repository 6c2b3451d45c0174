#!/bin/sh
# Small stand-in for the official postgres image's entrypoint (that image needs a registry we lack).
# Honours POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, PGDATA, PGPORT.
#   docker run IMAGE               -> initialise PGDATA once, then run postgres as user postgres
#   docker run IMAGE -c key=value  -> same, extra server options
#   docker run IMAGE pg_dump ...   -> run that command instead
set -eu
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)}
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_PASSWORD:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PGPORT:=5432}"
: "${LISTEN_ADDRESSES:=*}"
export PGDATA PGPORT

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ] && [ "$1" != postgres ]; then
  exec "$@"
fi
[ "${1:-}" = postgres ] && shift

asuser() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=$(mktemp); printf '%s' "$POSTGRES_PASSWORD" >"$pw"; chown postgres "$pw"
  asuser "$PGBIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pw" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pw"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [ "$POSTGRES_DB" != "postgres" ]; then
    # The set-up server listens on no TCP port and on a private socket directory, so that health
    # checks (pg_isready on the default socket or on TCP) never mistake it for the real server.
    init_sock=$(mktemp -d); chown postgres "$init_sock"
    asuser "$PGBIN/pg_ctl" -D "$PGDATA" -w \
      -o "-c listen_addresses='' -c unix_socket_directories='$init_sock' -p $PGPORT" start >/dev/null
    # the name travels as a psql variable, quoted as an identifier by psql itself
    printf '%s\n' 'CREATE DATABASE :"db";' | asuser "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 \
      -h "$init_sock" -p "$PGPORT" -U "$POSTGRES_USER" -d postgres -v db="$POSTGRES_DB" >/dev/null
    asuser "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    rmdir "$init_sock"
  fi
  echo "entrypoint: initialised $PGDATA (database $POSTGRES_DB, user $POSTGRES_USER)"
fi

exec setpriv --reuid=postgres --regid=postgres --init-groups \
  "$PGBIN/postgres" -D "$PGDATA" -c listen_addresses="$LISTEN_ADDRESSES" -c port="$PGPORT" "$@"

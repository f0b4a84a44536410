#!/bin/sh
# Like the official image's entrypoint: a new data directory gets the user
# POSTGRES_USER with POSTGRES_PASSWORD and the database POSTGRES_DB, and
# the server listens on every address (password login from the network).
set -eu
if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA"
  chown -R postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s' "${POSTGRES_PASSWORD:?}" > "$pwfile"
  initdb -D "$PGDATA" -U "${POSTGRES_USER:-postgres}" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  postgres -c listen_addresses='' -k /tmp &
  pid=$!
  until pg_isready -q -h /tmp; do sleep 0.1; done
  db=${POSTGRES_DB:-${POSTGRES_USER:-postgres}}
  if [ "$db" != postgres ]; then
    createdb -h /tmp -U "${POSTGRES_USER:-postgres}" "$db"
  fi
  kill -INT "$pid"
  wait "$pid"
fi
exec "$@"

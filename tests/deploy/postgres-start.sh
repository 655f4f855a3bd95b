#!/bin/sh
# The official image's contract, enough for compose.yaml: POSTGRES_USER/PASSWORD/DB on first start.
set -eu
data=/var/lib/postgresql/data
bin=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
mkdir -p "$data" /run/postgresql && chown -R postgres:postgres "$data" /run/postgresql
if [ ! -s "$data/PG_VERSION" ]; then
  echo "$POSTGRES_PASSWORD" > /tmp/pwfile && chown postgres /tmp/pwfile
  su postgres -c "$bin/initdb -D $data -U $POSTGRES_USER --pwfile=/tmp/pwfile --auth-host=scram-sha-256 --auth-local=trust"
  rm /tmp/pwfile
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$data/pg_hba.conf"
  su postgres -c "$bin/pg_ctl -D $data -o '-c listen_addresses=' -w start"
  su postgres -c "$bin/createdb -U $POSTGRES_USER $POSTGRES_DB"
  su postgres -c "$bin/pg_ctl -D $data -m fast -w stop"
fi
exec su postgres -c "exec $bin/postgres -D $data -c listen_addresses='*'"

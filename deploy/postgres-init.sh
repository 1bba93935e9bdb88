#!/bin/sh
# Prepares a new PostgreSQL data directory for pitr. Run once by the postgres image's
# entrypoint (docker-entrypoint-initdb.d/) after initdb; the settings take effect when the
# entrypoint starts the server for real. Works on any cluster: PGDATA=/path sh postgres-init.sh
#
#   - wal_level = replica and WAL senders: `pitr stream` and `pitr backup` use replication;
#   - a pg_hba.conf line for `replication` (the image only has `host all all all ...`, which
#     does not match replication connections, so `pitr stream` would be refused);
#   - archive_mode with `pitr archive-push`: WAL reaches the repository even while the
#     streamer is down (both write identical objects; the second write is a no-op).
#
# The repository and its credentials come from the server's environment (PITR_REPO, AWS_*):
# archive_command inherits it.
set -eu
: "${PGDATA:?PGDATA must name the data directory}"
PITR_BIN=${PITR_BIN:-/usr/local/bin/pitr}
AUTH=${PITR_REPLICATION_AUTH:-scram-sha-256}

cat >> "$PGDATA/postgresql.conf" <<CONF

# --- added by pitr's postgres-init.sh ---
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
archive_mode = on
archive_command = '$PITR_BIN archive-push %p'
archive_timeout = 60
CONF

# First match wins in pg_hba.conf: put the replication line first.
{
    echo "# --- added by pitr's postgres-init.sh: pitr stream and pitr backup ---"
    echo "host replication all all $AUTH"
    echo "local replication all trust"
    cat "$PGDATA/pg_hba.conf"
} > "$PGDATA/pg_hba.conf.pitr"
# Rewrite in place: the file keeps its owner and mode.
cat "$PGDATA/pg_hba.conf.pitr" > "$PGDATA/pg_hba.conf"
rm -f "$PGDATA/pg_hba.conf.pitr"
echo "pitr: replication allowed, archive_command = '$PITR_BIN archive-push %p'"

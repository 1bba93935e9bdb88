#!/usr/bin/env bash
# The whole pitr loop on a throwaway PostgreSQL, into a local repository at ./repo:
# archive WAL with `pitr archive-push`, take a base backup with `pitr backup` and an
# incremental one on top of it, write rows before and after a moment T, then `pitr restore --target-time T` into a new directory,
# start PostgreSQL on it and show that exactly the rows from before T came back; finally
# `pitr drill --target-time T` does the same by itself and reports the RTO it measured, and
# `pitr audit` shows who did what to the repository.
#
# Needs PostgreSQL (13+) server binaries (Debian: apt-get install postgresql-15) and cargo.
# Run as root, it runs PostgreSQL as the `postgres` user. Everything it starts, it stops.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REPO=$ROOT/repo
WORK=$ROOT/demo

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    PG_BIN=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
fi
[ -x "$PG_BIN/initdb" ] || { echo "PostgreSQL server binaries not found: apt-get install postgresql-15 (or set PG_BIN)" >&2; exit 1; }

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

say "building pitr (release)"
cargo build --release --quiet
rm -rf "$WORK" "$REPO"
mkdir -p "$WORK" "$REPO"
PITR=$WORK/pitr
cp target/release/pitr "$PITR"
[ "$(id -u)" = 0 ] && chown -R postgres "$WORK" "$REPO"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P1=$(port); P2=$(port)
cleanup() {
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/restored" -m immediate stop >/dev/null 2>&1 || true
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -m immediate stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
psql1() { as_pg "$PG_BIN/psql" -X -A -t -h "$WORK" -p "$P1" -d postgres -c "$1"; }
psql2() { as_pg "$PG_BIN/psql" -X -A -t -h "$WORK" -p "$P2" -d postgres -c "$1"; }

say "a throwaway cluster archiving into $REPO (archive_command = 'pitr archive-push %p')"
as_pg "$PG_BIN/initdb" -D "$WORK/primary" -U postgres --auth=trust --no-sync >/dev/null
cat >> "$WORK/primary/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$WORK'
port = $P1
wal_level = replica
archive_mode = on
archive_command = '$PITR --repo $REPO archive-push %p'
CONF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -l "$WORK/primary.log" -w start >/dev/null
psql1 "create table orders(id int primary key, note text, at timestamptz default clock_timestamp())" >/dev/null
psql1 "insert into orders(id, note) select g, 'before the backup' from generate_series(1, 1000) g" >/dev/null

say "pitr backup (BASE_BACKUP over the replication protocol, straight into the repository)"
as_pg "$PITR" --repo "$REPO" backup -d "host=$WORK port=$P1 user=postgres"

psql1 "insert into orders(id, note) select g, 'after the backup, before T' from generate_series(1001, 1500) g" >/dev/null

say "pitr backup --incremental (only the blocks that changed since the backup above)"
as_pg "$PITR" --repo "$REPO" backup --incremental -d "host=$WORK port=$P1 user=postgres"
sleep 1
T=$(psql1 "select now()")
sleep 1
psql1 "insert into orders(id, note) select g, 'after T: must not come back' from generate_series(1501, 2000) g" >/dev/null
psql1 "delete from orders where id <= 100" >/dev/null
psql1 "select pg_switch_wal()" >/dev/null
seg=$(psql1 "select last_archived_wal from pg_stat_archiver")
for _ in $(seq 1 100); do
    now=$(psql1 "select coalesce(last_archived_wal, '') from pg_stat_archiver")
    [ "$now" != "$seg" ] && [ -n "$now" ] && break
    sleep 0.1
done
echo "primary now has: $(psql1 "select count(*) from orders") rows (1900: 2000 inserted, 100 deleted after T)"
echo "T = $T"

say "pitr list"
"$PITR" --repo "$REPO" list

say "pitr restore --target-time '$T'"
as_pg "$PITR" --repo "$REPO" restore --pgdata "$WORK/restored" --target-time "$T"
cat >> "$WORK/restored/postgresql.auto.conf" <<CONF
port = $P2
archive_mode = off
CONF

say "starting PostgreSQL on the restored directory: it replays WAL from the repository up to T"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/restored" -l "$WORK/restored.log" -w -t 120 start >/dev/null
for _ in $(seq 1 100); do [ "$(psql2 "select pg_is_in_recovery()")" = f ] && break; sleep 0.2; done
grep -E "recovery stopping|restored log file" "$WORK/restored.log" | sed 's/^/  postgres: /' | tail -n 4
echo
echo "restored cluster has:"
psql2 "select note, count(*) from orders group by note order by min(id)" | sed 's/|/: /; s/^/  /'
rows=$(psql2 "select count(*) from orders")
if [ "$rows" = 1500 ]; then
    echo; echo "exactly the 1500 rows committed before T are back: the loop works."
else
    echo; echo "unexpected: $rows rows (expected 1500)" >&2; exit 1
fi

say "pitr drill --target-time '$T': the same restore, started, checked and timed by pitr itself"
drilled=$(as_pg "$PITR" --repo "$REPO" drill --target-time "$T" --pg-bin "$PG_BIN" \
    --check-sql "select count(*) from orders" --scratch-dir "$WORK")
echo "$drilled"
echo "$drilled" | grep -qE '^drill: +ok' || { echo "the drill failed" >&2; exit 1; }
echo "$drilled" | grep -qE '^check: +1500$' || { echo "the drill restored other rows" >&2; exit 1; }

say "pitr audit: every backup, restore and drill is recorded in the repository"
"$PITR" --repo "$REPO" audit
echo "The repository stays in $REPO; the clusters were stopped (data in $WORK)."

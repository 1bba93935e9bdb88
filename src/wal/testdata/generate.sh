#!/usr/bin/env bash
# Regenerates the real-WAL fixtures used by src/wal tests (PostgreSQL 15, 1 MiB segments).
#
# Run as root from the repository root:  src/wal/testdata/generate.sh
# Needs /usr/lib/postgresql/15/bin and zstd. The cluster runs as the `postgres` user in a temp
# dir, on a unix socket only, and is removed afterwards. Output (replaces what is there):
#   pg15/<segment>.zst   the WAL segments from the first pg_switch_wal() to the last one written
#   pg15/waldump.txt     `pg_waldump` over all of them (TZ=UTC, lines cut at 300 chars), the test oracle
#   pg15/segments.txt    segment file names, in order
# The workload is chosen to exercise what the reader must handle; see README.md.
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
OUT=$(cd "$(dirname "$0")" && pwd)/pg15
WORK=$(mktemp -d /tmp/pitr-walgen.XXXXXX)
PORT=${PORT:-54329}
trap 'runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
chown postgres "$WORK"

pg() { runuser -u postgres -- "$@"; }
sql() { pg "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT" -U postgres -d postgres "$@"; }

pg "$PGBIN/initdb" -D "$WORK/data" --wal-segsize=1 -A trust -U postgres --no-sync >/dev/null
cat >>"$WORK/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK'
wal_level = logical
wal_recycle = off          # new segments are zero-filled, so the tail of the last one reads as end-of-WAL
wal_keep_size = 256MB      # keep every segment of the workload until we copy them
max_prepared_transactions = 5
autovacuum = off
checkpoint_timeout = 1h
max_wal_size = 1GB
fsync = off
CONF
pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/log" -w start >/dev/null

first=$(sql -Atc "select pg_walfile_name(pg_switch_wal())")
first=$(sql -Atc "select pg_walfile_name(pg_current_wal_insert_lsn())")

sql <<'SQL'
create table t(id int, v text);
insert into t select g, md5(g::text) from generate_series(1, 200) g;          -- COMMIT
begin; insert into t values (-1, 'aborted'); rollback;                         -- ABORT
select pg_create_restore_point('rp1');                                         -- RESTORE_POINT
create table big(v text);
alter table big alter column v set storage plain;
insert into big values (repeat('x', 7000));                                    -- record spanning WAL pages
checkpoint;                                                                    -- CHECKPOINT_ONLINE + redo
update t set v = v || 'u' where id <= 100;                                     -- full-page images
begin; insert into t values (-2, '2pc commit'); prepare transaction 'g1';
commit prepared 'g1';                                                          -- COMMIT_PREPARED
begin; insert into t values (-3, '2pc abort'); prepare transaction 'g2';
rollback prepared 'g2';                                                        -- ABORT_PREPARED
-- Pad with logical messages until close to a segment boundary, then write one record that
-- crosses it, so the next segment starts with XLP_FIRST_IS_CONTRECORD.
do $$
declare r bigint;
begin
  loop
    r := 1048576 - ((pg_current_wal_insert_lsn() - '0/0'::pg_lsn) % 1048576);
    exit when r < 15000 and r > 2000;
    perform pg_logical_emit_message(false, 'pad', repeat('p', greatest(500, least(r - 8000, 200000)::int)));
  end loop;
  perform pg_logical_emit_message(false, 'cross', repeat('c', 20000));
end $$;
select pg_create_restore_point('rp2');
select pg_switch_wal();                                                         -- SWITCH
insert into t values (1000, 'after switch');
SQL
pg "$PGBIN/pg_ctl" -D "$WORK/data" -m fast -w stop >/dev/null                  # CHECKPOINT_SHUTDOWN
# The last segment is the one holding the shutdown checkpoint; later files in pg_wal are
# preallocated/recycled segments with no records of ours.
ckpt=$(pg "$PGBIN/pg_controldata" -D "$WORK/data" | sed -n 's/^Latest checkpoint location: *//p')
last=$(pg "$PGBIN/pg_waldump" -p "$WORK/data/pg_wal" -s "$ckpt" -n 1 2>/dev/null >/dev/null; \
  printf '%08X%08X%08X' 1 $(( 0x${ckpt%%/*} )) $(( (0x${ckpt#*/}) >> 20 )))

rm -rf "$OUT" && mkdir -p "$OUT"
: >"$OUT/segments.txt"
for f in $(ls "$WORK/data/pg_wal" | grep -E '^[0-9A-F]{24}$' | sort); do
  if [[ "$f" < "$first" || "$f" > "$last" ]]; then continue; fi
  echo "$f" >>"$OUT/segments.txt"
  zstd -q -19 <"$WORK/data/pg_wal/$f" >"$OUT/$f.zst"
done
# pg_waldump ends with an "invalid record length ... got 0" error at the end of WAL; keep stdout only.
TZ=UTC pg "$PGBIN/pg_waldump" -p "$WORK/data/pg_wal" "$first" "$last" 2>"$WORK/waldump.err" \
  | cut -c1-300 >"$OUT/waldump.txt" || true   # logical message payloads are dumped in full: cut them
echo "pg_waldump stderr: $(cat "$WORK/waldump.err")" >&2
ls -l "$OUT"

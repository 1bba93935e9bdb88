#!/usr/bin/env bash
# Benchmark: `pitr verify --full` throughput in MB/s of WAL, against pg_waldump reading the very
# same segments, in one run, as a ratio. Also measures what summarizing costs archive-push.
#
#   bench/verify.sh [SCALE] [SECONDS]     (defaults: pgbench scale 20, 20 s of load)
#
# Starts a throwaway PostgreSQL 15 cluster (16 MiB segments) archiving with pitr into a local
# repository and, for pg_waldump, copying the raw segments aside; builds pitr in release mode.
# Needs PG15 at /usr/lib/postgresql/15/bin (override with PGBIN). Runs as the current user, or as
# `postgres` through runuser when root. With KEEP_WAL=DIR the raw segments are copied to DIR
# afterwards (for profiling the reader on the same WAL, e.g. with bench/wal_bench.rs).
set -euo pipefail

SCALE=${1:-20}
SECONDS_LOAD=${2:-20}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
PITR="$ROOT/target/release/pitr"

WORK=$(mktemp -d /tmp/pitr-bench-verify.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  if [ -n "${KEEP_WAL:-}" ] && [ -d "$WORK/raw" ]; then mkdir -p "$KEEP_WAL" && cp "$WORK/raw"/* "$KEEP_WAL"/; fi
  as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/repo" "$WORK/raw" "$WORK/sock"
[ "$(id -u)" = 0 ] && chown -R postgres "$WORK"
# A copy of the binary the server user can run, whatever the permissions on the checkout.
cp "$PITR" "$WORK/pitr" && chmod 755 "$WORK/pitr"

as_pg "$PGBIN/initdb" -D "$WORK/data" -U postgres --no-sync >/dev/null
PORT=$((20000 + RANDOM % 20000))
cat >>"$WORK/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
archive_mode = on
archive_command = 'cp %p $WORK/raw/%f && $WORK/pitr --repo $WORK/repo --log-level warn archive-push %p'
max_wal_size = 4GB
fsync = off
CONF
as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/log" -w start >/dev/null
PSQL=(as_pg "$PGBIN/psql" -h "$WORK/sock" -p "$PORT" -U postgres -qAtX)
as_pg "$PGBIN/pgbench" -h "$WORK/sock" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
as_pg "$PGBIN/pgbench" -h "$WORK/sock" -p "$PORT" -U postgres -c 4 -T "$SECONDS_LOAD" postgres >/dev/null 2>&1
LAST=$("${PSQL[@]}" -c "select pg_walfile_name(pg_switch_wal())")
until [ "$("${PSQL[@]}" -c "select coalesce(last_archived_wal,'') >= '$LAST' from pg_stat_archiver")" = t ]; do sleep 0.2; done
as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -m fast -w stop >/dev/null

SEGS=$(ls "$WORK/raw" | grep -E '^[0-9A-F]{24}$' | sort)
FIRST=$(echo "$SEGS" | head -1)
LASTSEG=$(echo "$SEGS" | tail -1)
N=$(echo "$SEGS" | wc -l)
BYTES=$((N * 16 * 1024 * 1024))
echo "WAL: $N segments ($((BYTES / 1048576)) MiB), $FIRST .. $LASTSEG; $(nproc) CPUs"

now() { date +%s.%N; }
# Warm the page cache for both readers.
cat "$WORK/raw"/* "$WORK/repo"/wal/*/* >/dev/null

best_pitr=999999
for i in 1 2 3; do
  t0=$(now); "$PITR" --repo "$WORK/repo" verify --full --json >"$WORK/verify.json"; t1=$(now)
  t=$(echo "$t1 - $t0" | bc -l); if (( $(echo "$t < $best_pitr" | bc -l) )); then best_pitr=$t; fi
done
records=$(python3 -c "import json;print(json.load(open('$WORK/verify.json'))['wal_records'])")
errors=$(python3 -c "import json;r=json.load(open('$WORK/verify.json'));print(sum(p['severity']=='error' for p in r['problems']))")

best_dump=999999; best_dump_q=999999
for i in 1 2 3; do
  t0=$(now); "$PGBIN/pg_waldump" -p "$WORK/raw" "$FIRST" "$LASTSEG" >/dev/null 2>&1 || true; t1=$(now)
  t=$(echo "$t1 - $t0" | bc -l); if (( $(echo "$t < $best_dump" | bc -l) )); then best_dump=$t; fi
  t0=$(now); "$PGBIN/pg_waldump" -q -p "$WORK/raw" "$FIRST" "$LASTSEG" >/dev/null 2>&1 || true; t1=$(now)
  t=$(echo "$t1 - $t0" | bc -l); if (( $(echo "$t < $best_dump_q" | bc -l) )); then best_dump_q=$t; fi
done
dump_records=$("$PGBIN/pg_waldump" -p "$WORK/raw" "$FIRST" "$LASTSEG" 2>/dev/null | wc -l)

mbs() { echo "scale=1; $BYTES / 1000000 / $1" | bc -l; }
printf 'pitr verify --full : %6.2fs  %7s MB/s  (%s records, %s errors; includes LIST, lz4 decode, frame CRCs, summaries)\n' \
  "$best_pitr" "$(mbs "$best_pitr")" "$records" "$errors"
printf 'pg_waldump         : %6.2fs  %7s MB/s  (%s records printed to /dev/null)\n' "$best_dump" "$(mbs "$best_dump")" "$dump_records"
printf 'pg_waldump --quiet : %6.2fs  %7s MB/s  (parse and validate only)\n' "$best_dump_q" "$(mbs "$best_dump_q")"
printf 'ratio pitr/pg_waldump: %.2fx   pitr/pg_waldump --quiet: %.2fx\n' \
  "$(echo "$best_dump / $best_pitr" | bc -l)" "$(echo "$best_dump_q / $best_pitr" | bc -l)"

# What summarizing costs archive-push: push one full segment into a fresh repository with debug
# logging, which reports the summarize time, and time the whole push.
SEG="$WORK/raw/$(echo "$SEGS" | sed -n "$((N / 2))p")"
mkdir -p "$WORK/repo2"
t0=$(now)
"$PITR" --repo "$WORK/repo2" --log-level debug archive-push "$SEG" 2>"$WORK/push.log"
t1=$(now)
us=$(grep -o 'summarize_us=[0-9]*' "$WORK/push.log" | head -1 | cut -d= -f2)
printf 'archive-push of one 16 MiB segment: %.1f ms total, of which summarizing %s us\n' \
  "$(echo "($t1 - $t0) * 1000" | bc -l)" "$us"

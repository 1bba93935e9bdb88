#!/usr/bin/env bash
# Benchmark: `pitr verify --full` throughput in MB/s of WAL, against pg_waldump reading the very
# same segments, in one run, as a ratio. Also measures what summarizing costs archive-push.
#
#   bench/verify.sh [SCALE] [SECONDS]     (defaults: pgbench scale 20, 20 s of load)
#   BASE=/path/to/pitr bench/verify.sh ...  (also time that binary, e.g. the previous commit's)
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

# Best of 5, the readers interleaved in each round so that load from other jobs on a shared
# machine spreads over all of them. BASE=/path/to/another/pitr adds that binary (e.g. a build of
# the previous commit) to the same rounds, for before/after numbers from one run.
mbs() { echo "scale=1; $BYTES / 1000000 / $1" | bc -l; }
timed() { local t0 t1; t0=$(now); "$@" >/dev/null 2>&1 || true; t1=$(now); echo "$t1 - $t0" | bc -l; }
min() { if (( $(echo "$1 < $2" | bc -l) )); then echo "$1"; else echo "$2"; fi; }
best_pitr=999999; best_base=999999; best_dump=999999; best_dump_q=999999
for i in 1 2 3 4 5; do
  best_pitr=$(min "$best_pitr" "$(timed "$PITR" --repo "$WORK/repo" verify --full --json)")
  if [ -n "${BASE:-}" ]; then
    best_base=$(min "$best_base" "$(timed "$BASE" --repo "$WORK/repo" verify --full --json)")
  fi
  best_dump=$(min "$best_dump" "$(timed "$PGBIN/pg_waldump" -p "$WORK/raw" "$FIRST" "$LASTSEG")")
  best_dump_q=$(min "$best_dump_q" "$(timed "$PGBIN/pg_waldump" -q -p "$WORK/raw" "$FIRST" "$LASTSEG")")
done
"$PITR" --repo "$WORK/repo" verify --full --json >"$WORK/verify.json" || true
records=$(python3 -c "import json;print(json.load(open('$WORK/verify.json'))['wal_records'])")
errors=$(python3 -c "import json;r=json.load(open('$WORK/verify.json'));print(sum(p['severity']=='error' for p in r['problems']))")
dump_records=$("$PGBIN/pg_waldump" -p "$WORK/raw" "$FIRST" "$LASTSEG" 2>/dev/null | wc -l)

printf 'pitr verify --full : %6.3fs  %7s MB/s  (%s records, %s errors; includes LIST, lz4 decode, frame CRCs, summaries)\n' \
  "$best_pitr" "$(mbs "$best_pitr")" "$records" "$errors"
if [ -n "${BASE:-}" ]; then
  printf 'BASE verify --full : %6.3fs  %7s MB/s  (%s)\n' "$best_base" "$(mbs "$best_base")" "$BASE"
fi
printf 'pg_waldump         : %6.3fs  %7s MB/s  (%s records printed to /dev/null)\n' "$best_dump" "$(mbs "$best_dump")" "$dump_records"
printf 'pg_waldump --quiet : %6.3fs  %7s MB/s  (parse and validate only)\n' "$best_dump_q" "$(mbs "$best_dump_q")"
printf 'ratio pitr/pg_waldump: %.2fx   pitr/pg_waldump --quiet: %.2fx\n' \
  "$(echo "$best_dump / $best_pitr" | bc -l)" "$(echo "$best_dump_q / $best_pitr" | bc -l)"
if [ -n "${BASE:-}" ]; then
  printf 'ratio BASE/pg_waldump: %.2fx   BASE/pg_waldump --quiet: %.2fx   pitr vs BASE: %.2fx faster\n' \
    "$(echo "$best_dump / $best_base" | bc -l)" "$(echo "$best_dump_q / $best_base" | bc -l)" \
    "$(echo "$best_base / $best_pitr" | bc -l)"
fi

# What summarizing costs archive-push: push every segment, in order (so each carries its tail to
# the next, as in production), into a fresh repository with debug logging, which reports the
# summarize time of each; print the median and the mean over the segments.
push_all() { # BINARY REPO: prints "median mean" of summarize_us, and the mean ms per push
  local bin=$1 repo=$2 seg t0 t1
  mkdir -p "$repo"; : >"$repo.log"
  t0=$(now)
  for seg in $SEGS; do "$bin" --repo "$repo" --log-level debug archive-push "$WORK/raw/$seg" 2>>"$repo.log"; done
  t1=$(now)
  grep -o 'summarize_us=[0-9]*' "$repo.log" | cut -d= -f2 | sort -n |
    awk -v ms="$(echo "($t1 - $t0) * 1000 / $N" | bc -l)" \
      '{ v[NR] = $1; s += $1 } END { printf "%d %d %.1f\n", v[int((NR + 1) / 2)], s / NR, ms }'
}
read -r med mean ms <<<"$(push_all "$PITR" "$WORK/push-pitr")"
printf 'archive-push, per 16 MiB segment: %.1f ms end to end; summarizing median %s us, mean %s us\n' "$ms" "$med" "$mean"
if [ -n "${BASE:-}" ]; then
  read -r med mean ms <<<"$(push_all "$BASE" "$WORK/push-base")"
  printf 'BASE archive-push, per segment  : %.1f ms end to end; summarizing median %s us, mean %s us\n' "$ms" "$med" "$mean"
fi

# The reader and summarizer alone on the same segments (bench/wal_bench.rs).
cargo build --release --quiet --example wal_bench --manifest-path "$ROOT/Cargo.toml"
"$ROOT/target/release/examples/wal_bench" "$WORK/raw" 5

#!/usr/bin/env bash
# pitr stream vs pg_receivewal, side by side in one run on one PostgreSQL 15 server.
#
#   bench/stream.sh [SCALE] [LOAD_SECONDS]      (defaults: 30 and 20)
#   BASE=/path/to/old/pitr ROUNDS=3 STEADY=0 METHODS="recv pitr pitr-base" bench/stream.sh 30
#   WAL_SEGSIZE=1024 ROUNDS=3 STEADY=0 bench/stream.sh 60   (initdb --wal-segsize, in MiB)
#
# 1. catch-up: all receivers stopped, `pgbench -i -s SCALE` writes WAL (SCALE 30 is about
#    500 MiB, 60 about 1 GiB), then each receiver alone catches up to the same LSN, timed by
#    /usr/bin/time -v (wall, CPU, peak RSS). pg_receivewal writes to a local directory with
#    fsync; pitr stream compresses (lz4) and writes to a local repository with fsync, or to
#    s3s-fs on 127.0.0.1 when PITR_BENCH_S3=1. METHODS (default "recv pitr", plus pitr-base
#    when BASE=/path/to/pitr is set: that binary streams into its own repository and slot) and
#    ROUNDS (default 1; each round writes the WAL again, the method order rotating per round).
# 2. steady state (STEADY=1, the default; needs recv and pitr in METHODS): both running,
#    `pgbench -T LOAD_SECONDS -c 4`; pg_stat_replication sampled every second: flush lag in
#    bytes (server's current LSN minus reported flush) and the server's own flush_lag.
#
# Every catch-up goes to $WORK/catchup.tsv (method round seconds bytes cpu_s rss_kib) and the
# medians are printed at the end; STREAM_OUT=FILE copies that file. The work dir is removed on
# exit unless BENCH_KEEP=1.
#
# Needs: PostgreSQL 15 binaries in PG_BIN (default /usr/lib/postgresql/15/bin), a release
# build of pitr (cargo build --release), /usr/bin/time. Run as root (uses runuser -u postgres)
# or as a user that can run initdb. Nothing leaves the temp dir it prints.
set -euo pipefail

SCALE=${1:-30}
LOAD=${2:-20}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
WAL_SEGSIZE=${WAL_SEGSIZE:-16}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PITR=${PITR:-$ROOT/target/release/pitr}
[ -x "$PITR" ] || { echo "build first: cargo build --release" >&2; exit 1; }
ROUNDS=${ROUNDS:-1}
STEADY=${STEADY:-1}
if [ -n "${METHODS:-}" ]; then read -r -a METHODS <<<"$METHODS"
else METHODS=(recv pitr); [ -n "${BASE:-}" ] && METHODS+=(pitr-base); fi
for m in "${METHODS[@]}"; do
  case $m in
  recv | pitr) ;;
  pitr-base) [ -x "${BASE:-}" ] || { echo "method pitr-base needs BASE=/path/to/pitr" >&2; exit 1; } ;;
  *) echo "unknown method $m" >&2; exit 1 ;;
  esac
done
WORK=$(mktemp -d /tmp/pitr-bench.XXXXXX)
chmod 755 "$WORK"
PORT=${PORT:-55432}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then chown postgres "$WORK"; fi
cp "$PITR" "$WORK/pitr"; chmod 755 "$WORK/pitr"; PITR=$WORK/pitr
if [ -n "${BASE:-}" ]; then cp "$BASE" "$WORK/pitr-base"; chmod 755 "$WORK/pitr-base"; BASE=$WORK/pitr-base; fi

PGDATA=$WORK/data
as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust --no-sync -E UTF8 --wal-segsize="$WAL_SEGSIZE" >/dev/null
# initdb scales min_wal_size to 5 segments (5 GiB with 1 GiB segments): keep two.
MAX_WAL_MB=$((WAL_SEGSIZE * 8 > 4096 ? WAL_SEGSIZE * 8 : 4096))
cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$WORK'
port = $PORT
wal_level = replica
max_wal_senders = 10
min_wal_size = $((WAL_SEGSIZE * 2))MB
max_wal_size = ${MAX_WAL_MB}MB
checkpoint_timeout = 30min
shared_buffers = 128MB
EOF
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$WORK/pg.log" -w start >/dev/null
cleanup() {
  set +e
  [ -n "${PITR_PID:-}" ] && kill -TERM "$PITR_PID" 2>/dev/null
  [ -n "${RECV_PID:-}" ] && kill -TERM "$RECV_PID" 2>/dev/null
  [ -n "${S3_PID:-}" ] && kill "$S3_PID" 2>/dev/null
  sleep 1
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1
  if [ -n "${STREAM_OUT:-}" ] && [ -f "$WORK/catchup.tsv" ]; then cp "$WORK/catchup.tsv" "$STREAM_OUT"; fi
  if [ -n "${BENCH_KEEP:-}" ]; then echo "work dir (logs): $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
PSQL() { as_pg "$PG_BIN/psql" -h "$WORK" -p "$PORT" -U postgres -Atq -c "$1" postgres; }
CONN="host=$WORK port=$PORT user=postgres"

REPO=$WORK/repo; mkdir -p "$REPO"
REPO_BASE=$WORK/repo-base; mkdir -p "$REPO_BASE"
declare -a PITR_ENV=()
if [ "${PITR_BENCH_S3:-0}" = 1 ]; then
  S3PORT=$((PORT + 1)); mkdir -p "$WORK/s3/bench"
  s3s-fs --host 127.0.0.1 --port "$S3PORT" --access-key bench --secret-key benchsecret "$WORK/s3" >"$WORK/s3.log" 2>&1 &
  S3_PID=$!; sleep 1
  REPO="s3://bench/repo"; REPO_BASE="s3://bench/repo-base"
  PITR_ENV=(AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_ENDPOINT_URL="http://127.0.0.1:$S3PORT" AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true)
fi
RECVDIR=$WORK/receivewal; mkdir -p "$RECVDIR"; if [ "$(id -u)" = 0 ]; then chown postgres "$RECVDIR"; fi

has() { case " ${METHODS[*]} " in *" $1 "*) return 0 ;; esac; return 1; }
# A slot only for the methods run: an unused slot would hold back WAL removal.
has pitr && PSQL "select pg_create_physical_replication_slot('pitr', true)" >/dev/null
has recv && PSQL "select pg_create_physical_replication_slot('recv', true)" >/dev/null
has pitr-base && PSQL "select pg_create_physical_replication_slot('pitrbase', true)" >/dev/null

run_pitr() { # $1 = log suffix
  env "${PITR_ENV[@]}" /usr/bin/time -v -o "$WORK/time.pitr.$1" \
    "$PITR" --repo "$REPO" stream -d "$CONN" --slot pitr --application-name pitr >"$WORK/pitr.$1.log" 2>&1 &
  PITR_PID=$!
}
run_pitr_base() { # $1 = log suffix
  env "${PITR_ENV[@]}" /usr/bin/time -v -o "$WORK/time.pitr-base.$1" \
    "$BASE" --repo "$REPO_BASE" stream -d "$CONN" --slot pitrbase --application-name pitrbase >"$WORK/pitr-base.$1.log" 2>&1 &
  PITR_PID=$!
}
run_recv() { # $1 = log suffix, $2 = extra args
  as_pg /usr/bin/time -v -o "$WORK/time.recv.$1" \
    "$PG_BIN/pg_receivewal" -d "$CONN application_name=recv" -S recv -D "$RECVDIR" -n ${2:-} >"$WORK/recv.$1.log" 2>&1 &
  RECV_PID=$!
}
wait_slot() { # slot target_lsn
  until [ "$(PSQL "select restart_lsn >= '$2' from pg_replication_slots where slot_name = '$1'")" = t ]; do sleep 0.05; done
}
# $1 is /usr/bin/time (or runuser): signal the program it runs, then wait for the wrapper.
stop_wait() {
  local child; child=$(pgrep -P "$1" | head -1)
  if [ -n "$child" ] && [ "$(ps -o comm= -p "$child")" = time ]; then child=$(pgrep -P "$child" | head -1); fi
  kill -TERM "${child:-$1}"; wait "$1" || true
}
timefield() { grep "$2" "$WORK/time.$1" | awk -F': ' '{print $2}'; }
report() { # name seconds bytes
  local name=$1 secs=$2 bytes=$3
  local user sys rss
  user=$(timefield "$name" "User time"); sys=$(timefield "$name" "System time"); rss=$(timefield "$name" "Maximum resident")
  printf "%-14s %8.2f s  %8.1f MB/s  cpu %6.2f s  peak RSS %6.1f MiB\n" "$name" "$secs" \
    "$(echo "$bytes / 1048576 / $secs" | bc -l)" "$(echo "$user + $sys" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
}

echo "== catch-up (pgbench -i -s $SCALE written, wal_segment_size $WAL_SEGSIZE MiB, while every receiver was stopped): ${METHODS[*]}, $ROUNDS round(s)"
: >"$WORK/catchup.tsv"
# One catch-up of method $1 in round $2 to TARGET: wall from start until the server has the
# receiver's flush at TARGET (slot restart_lsn), CPU and peak RSS of the whole process.
catchup() {
  local m=$1 r=$2 t0 t1 secs
  t0=$(date +%s.%N)
  case $m in
  recv) run_recv "catchup$r" "--endpos=$TARGET"; wait "$RECV_PID" || true; RECV_PID=; t1=$(date +%s.%N) ;;
  pitr) run_pitr "catchup$r"; wait_slot pitr "$TARGET"; t1=$(date +%s.%N); stop_wait "$PITR_PID"; PITR_PID= ;;
  pitr-base) run_pitr_base "catchup$r"; wait_slot pitrbase "$TARGET"; t1=$(date +%s.%N); stop_wait "$PITR_PID"; PITR_PID= ;;
  esac
  secs=$(echo "$t1 - $t0" | bc -l)
  report "$m.catchup$r" "$secs" "$BYTES"
  printf '%s\t%s\t%.3f\t%s\t%s\t%s\n' "$m" "$r" "$secs" "$BYTES" \
    "$(echo "$(timefield "$m.catchup$r" "User time") + $(timefield "$m.catchup$r" "System time")" | bc -l)" \
    "$(timefield "$m.catchup$r" "Maximum resident")" >>"$WORK/catchup.tsv"
}
NM=${#METHODS[@]}
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq 1 "$ROUNDS"); do
  START=$(PSQL "select pg_current_wal_lsn()")
  as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
  TARGET=$(PSQL "select pg_current_wal_lsn() from (select pg_switch_wal()) s")
  BYTES=$(PSQL "select '$TARGET'::pg_lsn - '$START'::pg_lsn")
  echo "round $r: WAL to catch up: $((BYTES / 1048576)) MiB ($START .. $TARGET)"
  for j in $(seq 0 $((NM - 1))); do
    catchup "${METHODS[$(((r - 1 + j) % NM))]}" "$r"
  done
  # the catch-up WAL is no longer needed by any slot: let the next round start from a checkpoint
  PSQL "checkpoint" >/dev/null
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== catch-up medians ($ROUNDS round(s), loadavg $LOAD0 -> $LOAD1)"
echo "| method | rounds | median s | median MB/s | median CPU s | max peak RSS MiB | every run, s |"
echo "|---|---|---|---|---|---|---|"
for m in "${METHODS[@]}"; do
  awk -F'\t' -v m="$m" '$1 == m {n++; s[n] = $3; c[n] = $5; b = $4; if ($6 > rss) rss = $6; all = all (all ? ", " : "") sprintf("%.2f", $3)}
    function med(a, n,   i, j, t) {for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] > a[j]; j--) {t = a[j]; a[j] = a[j-1]; a[j-1] = t}
      return n % 2 ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2}
    END {if (n) {ms = med(s, n); printf "| %s | %d | %.2f | %.1f | %.2f | %.1f | %s |\n", m, n, ms, b / 1048576 / ms, med(c, n), rss / 1024, all}}' "$WORK/catchup.tsv"
done

if [ "$STEADY" != 1 ] || ! has recv || ! has pitr; then
  echo "machine: $(nproc) cores, $(uname -sr); repo: $REPO; wal_segment_size ${WAL_SEGSIZE} MiB"
  exit 0
fi
echo "== steady state: pgbench -T $LOAD -c 4 with both receivers running"
run_recv steady; run_pitr steady; sleep 2
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PORT" -U postgres -T "$LOAD" -c 4 -j 2 postgres >"$WORK/pgbench.log" 2>&1 &
LOAD_PID=$!
: >"$WORK/lag.tsv"
while kill -0 "$LOAD_PID" 2>/dev/null; do
  PSQL "select application_name, pg_current_wal_lsn() - flush_lsn, coalesce(extract(epoch from flush_lag), 0) from pg_stat_replication" | tr '|' '\t' >>"$WORK/lag.tsv"
  sleep 1
done
TPS=$(grep -o 'tps = [0-9.]*' "$WORK/pgbench.log" | head -1)
for app in recv pitr; do
  awk -v a=$app '$1==a { n++; b+=$2; if ($2>mb) mb=$2; s+=$3; if ($3>ms) ms=$3 } END {
    printf "%-6s flush lag: avg %8.0f bytes (max %9.0f), flush_lag avg %.2f s (max %.2f s), %d samples\n", a, b/n, mb, s/n, ms, n }' "$WORK/lag.tsv"
done
echo "pgbench: $TPS"
stop_wait "$PITR_PID"; PITR_PID=; stop_wait "$RECV_PID"; RECV_PID=
report pitr.steady 1 0 | awk '{print "pitr steady:", $6, $7, $8, $9, $10, $11}'
report recv.steady 1 0 | awk '{print "recv steady:", $6, $7, $8, $9, $10, $11}'
echo "machine: $(nproc) cores, $(uname -sr); repo: $REPO"

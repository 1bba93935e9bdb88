#!/usr/bin/env bash
# pitr stream vs pg_receivewal, side by side in one run on one PostgreSQL 15 server.
#
#   bench/stream.sh [SCALE] [LOAD_SECONDS]      (defaults: 30 and 20)
#
# 1. catch-up: both receivers stopped, `pgbench -i -s SCALE` writes WAL (SCALE 30 is about
#    500 MiB, 60 about 1 GiB), then each receiver alone catches up to the same LSN, timed by
#    /usr/bin/time -v (wall, CPU, peak RSS). pg_receivewal writes to a local directory with
#    fsync; pitr stream compresses (lz4) and writes to a local repository with fsync, or to
#    s3s-fs on 127.0.0.1 when PITR_BENCH_S3=1.
# 2. steady state: both running, `pgbench -T LOAD_SECONDS -c 4`; pg_stat_replication sampled
#    every second: flush lag in bytes (server's current LSN minus reported flush) and the
#    server's own flush_lag.
#
# Needs: PostgreSQL 15 binaries in PG_BIN (default /usr/lib/postgresql/15/bin), a release
# build of pitr (cargo build --release), /usr/bin/time. Run as root (uses runuser -u postgres)
# or as a user that can run initdb. Nothing leaves the temp dir it prints.
set -euo pipefail

SCALE=${1:-30}
LOAD=${2:-20}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PITR=${PITR:-$ROOT/target/release/pitr}
[ -x "$PITR" ] || { echo "build first: cargo build --release" >&2; exit 1; }
WORK=$(mktemp -d /tmp/pitr-bench.XXXXXX)
chmod 755 "$WORK"
PORT=${PORT:-55432}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then chown postgres "$WORK"; fi
cp "$PITR" "$WORK/pitr"; chmod 755 "$WORK/pitr"; PITR=$WORK/pitr

PGDATA=$WORK/data
as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust --no-sync -E UTF8 >/dev/null
cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$WORK'
port = $PORT
wal_level = replica
max_wal_senders = 10
max_wal_size = 4GB
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
  echo "work dir (logs): $WORK"
}
trap cleanup EXIT
PSQL() { as_pg "$PG_BIN/psql" -h "$WORK" -p "$PORT" -U postgres -Atq -c "$1" postgres; }
CONN="host=$WORK port=$PORT user=postgres"

REPO=$WORK/repo; mkdir -p "$REPO"
declare -a PITR_ENV=()
if [ "${PITR_BENCH_S3:-0}" = 1 ]; then
  S3PORT=$((PORT + 1)); mkdir -p "$WORK/s3/bench"
  s3s-fs --host 127.0.0.1 --port "$S3PORT" --access-key bench --secret-key benchsecret "$WORK/s3" >"$WORK/s3.log" 2>&1 &
  S3_PID=$!; sleep 1
  REPO="s3://bench/repo"
  PITR_ENV=(AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_ENDPOINT_URL="http://127.0.0.1:$S3PORT" AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true)
fi
RECVDIR=$WORK/receivewal; mkdir -p "$RECVDIR"; if [ "$(id -u)" = 0 ]; then chown postgres "$RECVDIR"; fi

PSQL "select pg_create_physical_replication_slot('pitr', true)" >/dev/null
PSQL "select pg_create_physical_replication_slot('recv', true)" >/dev/null

run_pitr() { # $1 = log suffix
  env "${PITR_ENV[@]}" /usr/bin/time -v -o "$WORK/time.pitr.$1" \
    "$PITR" --repo "$REPO" stream -d "$CONN" --slot pitr --application-name pitr >"$WORK/pitr.$1.log" 2>&1 &
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

echo "== catch-up (pgbench -i -s $SCALE written while both receivers were stopped)"
START=$(PSQL "select pg_current_wal_lsn()")
as_pg "$PG_BIN/pgbench" -h "$WORK" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
TARGET=$(PSQL "select pg_current_wal_lsn() from (select pg_switch_wal()) s")
BYTES=$(PSQL "select '$TARGET'::pg_lsn - '$START'::pg_lsn")
echo "WAL to catch up: $((BYTES / 1048576)) MiB ($START .. $TARGET)"

t0=$(date +%s.%N); run_recv catchup "--endpos=$TARGET"; wait "$RECV_PID" || true; RECV_PID=
t1=$(date +%s.%N); report recv.catchup "$(echo "$t1 - $t0" | bc -l)" "$BYTES"

t0=$(date +%s.%N); run_pitr catchup; wait_slot pitr "$TARGET"
t1=$(date +%s.%N); stop_wait "$PITR_PID"; PITR_PID=
report pitr.catchup "$(echo "$t1 - $t0" | bc -l)" "$BYTES"

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

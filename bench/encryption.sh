#!/usr/bin/env bash
# The cost of encryption at rest: archive-push, archive-get, backup and restore with and without
# encryption, in one run, interleaved (docs/encryption.md, docs/benchmarks.md).
#
#   sudo bench/encryption.sh                      # N=20 segments, scale 30, 3 rounds
#   N=40 SCALE=50 REPS=5 sudo bench/encryption.sh
#
# 1. archive-push / archive-get: real 16 MiB WAL segments from pgbench (TPC-B, archived by cp),
#    each pushed into two empty local repositories, `plain` (pitr's default, lz4) and `enc` (the
#    same plus --encryption-key-file: one key-file read, one Argon2id at the default cost, one
#    LIST + GET of the keyring, then seal), alternating which goes first from segment to segment.
#    Then read back with archive-get the same way (bytes compared). `enc` uses the key cache
#    (docs/encryption.md, "Key cache": one LIST of keys/, no Argon2id once the first process has
#    written the entry); `enc-nocache` is the same repository with PITR_ENCRYPTION_KEY_CACHE=off
#    (the KDF and the keyring GET in every process), for comparison.
# 2. backup: pgbench -i -s SCALE; the cluster archives into both backup repositories
#    (archive_command pushes to each); REPS rounds of `pitr backup` into each, order alternating.
#    MB/s = database size / wall time.
# 3. restore: REPS rounds of `pitr restore --pgdata` (latest) from each (files only: replay is
#    PostgreSQL's and the same for both; archive-get per segment is measured in 1).
#
# Targets (issue 11): archive-push <= 1.1x plain, backup throughput >= 0.9x plain.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=${N:-20}
SCALE=${SCALE:-30}
REPS=${REPS:-3}

bench_init encryption
machine_info | tee "$BT/machine.txt" >&2

R="$BT/repos"
KEY="$BT/key"
openssl rand -base64 32 >"$KEY"
chmod 600 "$KEY"
mkdir -p "$R/push-plain" "$R/push-enc" "$R/push-enc-nocache" "$R/bk-plain" "$R/bk-enc" "$BT/get" "$BT/restore"
chown -R postgres:postgres "$R" "$BT/get" "$BT/restore" "$KEY"

pitr_for() { # method repository-name -> command words
    case $1 in
    plain) echo "$PITR" --repo "$R/$2" ;;
    enc) echo "$PITR" --repo "$R/$2" --encryption-key-file "$KEY" ;;
    enc-nocache) echo env PITR_ENCRYPTION_KEY_CACHE=off "$PITR" --repo "$R/$2" --encryption-key-file "$KEY" ;;
    esac
}
METHODS=(plain enc)
# The key cache of this run's postgres processes lives in the temp dir, not in ~postgres.
export PITR_ENCRYPTION_KEY_CACHE="$BT/key-cache"
PUSH_METHODS=(plain enc enc-nocache)

# ---- 1. archive-push / archive-get ---------------------------------------------------------
tpcb_archived_segments $((N + 1))
mapfile -t SEGS < <(find "$SRC" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' -printf '%f\n' | sort | tail -n $((N + 1)))
WARM=${SEGS[0]}
SEGS=("${SEGS[@]:1}")
log "segments: ${SEGS[0]} .. ${SEGS[-1]} ($N timed, $WARM creates the repositories)"

run_push() { # method seg
    # shellcheck disable=SC2046
    measure "push/$1" "$2" $(pitr_for "$1" "push-$1") archive-push "$SRC/$2"
}
run_get() { # method seg
    local dest="$BT/get/$1/RECOVERYXLOG"
    mkdir -p "$BT/get/$1" && chown postgres:postgres "$BT/get/$1"
    rm -f "$dest"
    # shellcheck disable=SC2046
    measure "get/$1" "$2" $(pitr_for "$1" "push-$1") archive-get --prefetch 0 "$2" "$dest"
    cmp -s "$dest" "$SRC/$2" || die "get/$1 returned different bytes for $2"
}

for m in "${PUSH_METHODS[@]}"; do run_push "$m" "$WARM"; run_get "$m" "$WARM"; done
: >"$BT/results.jsonl"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
P=${#PUSH_METHODS[@]}
log "archive-push and archive-get: $N segments x $P, interleaved"
for i in "${!SEGS[@]}"; do
    for j in $(seq 0 $((P - 1))); do
        run_push "${PUSH_METHODS[$(((i + j) % P))]}" "${SEGS[$i]}"
    done
done
for i in "${!SEGS[@]}"; do
    for j in $(seq 0 $((P - 1))); do run_get "${PUSH_METHODS[$(((i + j) % P))]}" "${SEGS[$i]}"; done
done

# ---- 2. backup ---------------------------------------------------------------------------
CONN="host=$BT/sock port=$PORT user=postgres"
PUSH_BOTH="$(pitr_for plain bk-plain) archive-push %p && $(pitr_for enc bk-enc) archive-push %p"
psql_at "$PORT" "alter system set archive_command = '$PUSH_BOTH'" >/dev/null
psql_at "$PORT" "select pg_reload_conf()" >/dev/null
log "database: pgbench -i -s $SCALE"
as_pg "$PGBIN/pgbench" -h "$BT/sock" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >>"$BT/log/pgbench-init.log" 2>&1
psql_at "$PORT" "checkpoint" >/dev/null
DB_BYTES=$(psql_at "$PORT" "select sum(pg_database_size(datname))::bigint from pg_database")
log "database size $((DB_BYTES / 1000000)) MB; backups: ${METHODS[*]} x $REPS rounds"
for ((r = 1; r <= REPS; r++)); do
    for j in 0 1; do
        m=${METHODS[$(((r + j) % 2))]}
        # shellcheck disable=SC2046
        measure "backup/$m" "$r" $(pitr_for "$m" "bk-$m") backup --checkpoint fast -d "$CONN"
    done
done

# ---- 3. restore ----------------------------------------------------------------------------
psql_at "$PORT" "select pg_switch_wal()" >/dev/null
sleep 2
pg_stop "$PGDATA"
for ((r = 1; r <= REPS; r++)); do
    for j in 0 1; do
        m=${METHODS[$(((r + j) % 2))]}
        d="$BT/restore/$m-$r"
        mkdir -m 0700 "$d" && chown postgres:postgres "$d"
        # shellcheck disable=SC2046
        measure "restore/$m" "$r" $(pitr_for "$m" "bk-$m") restore --pgdata "$d"
        rm -rf "$d"
    done
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)

{
    echo
    echo "## encryption.sh results: $N segments of 16 MiB; backup and restore of $((DB_BYTES / 1000000)) MB x $REPS"
    echo
    sed 's/^/    /' "$BT/machine.txt"
    echo "    loadavg during run: $load0 -> $load1"
    report --prefix push/ --ref plain --mb 16.777216 --title "archive-push (x plain = encrypted / unencrypted)"
    report --prefix get/ --ref plain --mb 16.777216 --title "archive-get (--prefetch 0)"
    report --prefix backup/ --ref plain --mb "$(awk -v b="$DB_BYTES" 'BEGIN {print b / 1e6}')" --title "backup"
    report --prefix restore/ --ref plain --mb "$(awk -v b="$DB_BYTES" 'BEGIN {print b / 1e6}')" --title "restore (files only)"
    echo
    echo "### repository size"
    echo
    for d in push-plain push-enc push-enc-nocache bk-plain bk-enc; do
        echo "    $d: $(du -sk "$R/$d" | cut -f1) KiB"
    done
} | tee "$BT/report.md"
if [[ -n "${BENCH_OUT:-}" ]]; then cp "$BT/report.md" "$BENCH_OUT"; cp "$BT/results.jsonl" "${BENCH_OUT%.md}.jsonl"; fi

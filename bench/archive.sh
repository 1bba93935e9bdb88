#!/usr/bin/env bash
# Per-segment archive-push / archive-get latency and CPU: pitr vs pgBackRest vs cp + fsync.
#
#   sudo bench/archive.sh            # N=20 segments (plus one warm-up)
#   N=40 sudo bench/archive.sh
#   WORKLOAD=insert sudo bench/archive.sh   # WAL of inserts of md5 text rows instead of TPC-B
#   BASE=/path/to/old/pitr METHODS="floor pitr-lz4 pitr-base-lz4" REF=pitr-base-lz4 sudo bench/archive.sh
#                                    # a second pitr binary side by side (e.g. the previous commit)
#
# Generates real 16 MiB WAL segments with pgbench on a throwaway PostgreSQL cluster (archived by
# `cp` into a source directory), then for every segment runs each method once, in an order that
# rotates from segment to segment (A B C.. then B C.. A ...), so that machine noise lands on all
# methods alike; each segment's round starts with a memory warm-up (lib.sh warm_memory,
# ROUND_WARM=0 skips it). Every repository is a local directory on one file system (ARCHIVE_FS).
#
# push methods (each into its own empty repository):
#   floor      cp to a temp name, fsync it, rename, fsync the directory (what a durable copy costs)
#   pitr-lz4   pitr --compression lz4 archive-push   (pitr's default)
#   pitr-zstd  pitr --compression zstd archive-push  (level 3)
#   pgbr-lz4   pgbackrest archive-push, archive-async=n, compress-type=lz4 (level 1, its default)
#   pgbr-zst   pgbackrest ... compress-type=zst (level 3)
#   pgbr-gz    pgbackrest ... compress-type=gz (level 6: pgBackRest's default)
#   pitr-base-lz4 / pitr-base-zstd   the same as pitr-lz4 / pitr-zstd with the BASE binary (added
#              to the default list when BASE is set)
# METHODS="..." overrides the list (pgBackRest is set up only when a pgbr-* method is in it);
# REF=method sets the reference of the ratio columns (default pgbr-lz4). PUSH_IN_PGDATA=1 runs
# archive-push from the cluster's data directory, as PostgreSQL runs archive_command (pitr then
# also reads and keeps its pitr.repository marker there); by default it runs in the temp dir.
# get methods: the same, reading back what each pushed (floor = plain cp, no fsync: neither
# PostgreSQL nor the tools fsync a restored segment).
#
# Prints median wall ms and median CPU ms (user+sys, getrusage) per segment, and ratios: against
# pgbr-lz4 (like for like), median of per-segment paired ratios, and against the floor.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=${N:-20}
if [[ -n "${METHODS:-}" ]]; then
    read -r -a METHODS <<<"$METHODS"
else
    METHODS=(floor pitr-lz4 pitr-zstd pgbr-lz4 pgbr-zst pgbr-gz)
    [[ -n "${BASE:-}" ]] && METHODS+=(pitr-base-lz4)
fi
for m in "${METHODS[@]}"; do
    case $m in
    floor | pitr-lz4 | pitr-zstd | pgbr-lz4 | pgbr-zst | pgbr-gz) ;;
    pitr-base-lz4 | pitr-base-zstd) [[ -n "${BASE:-}" ]] || die "method $m needs BASE=/path/to/pitr" ;;
    *) die "unknown method $m" ;;
    esac
done
REF=${REF:-pgbr-lz4}
wants_pgbr "${METHODS[@]}" || NEED_PGBR=0

bench_init archive
machine_info | tee "$BT/machine.txt" >&2

WORKLOAD=${WORKLOAD:-tpcb}
case $WORKLOAD in
tpcb) tpcb_archived_segments $((N + 2)) ;;
insert) insert_archived_segments $((N + 2)) ;;
*) die "unknown WORKLOAD $WORKLOAD (tpcb or insert)" ;;
esac
# The newest N+1 archived segments, all written by the TPC-B run: the first one warms up every
# repository (pitr creates its descriptor, every method gets its directories), the rest are timed.
mapfile -t SEGS < <(find "$SRC" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' -printf '%f\n' | sort | tail -n $((N + 1)))
WARM=${SEGS[0]}
SEGS=("${SEGS[@]:1}")
log "segments: ${SEGS[0]} .. ${SEGS[-1]} ($N timed, $WARM warm-up)"

# Repositories and configurations.
# Repositories and restored segments live on a fresh journaled ext4 (ARCHIVE_FS=loop, the
# default; ARCHIVE_FS=dir writes under $BT): on this VM's root file system (ext4 without a
# journal) every file create scans the inodes freed in the last minutes, and each push frees one
# (its temporary file), so the cost of a create grew through a run (docs/benchmarks.md, round six).
ARCHIVE_FS=${ARCHIVE_FS:-loop}
W="$BT"
if [[ $ARCHIVE_FS == loop ]]; then
    W="$BT/fs"
    mount_scratch_fs "$W" 16
fi
R="$W/repos"
GET="$W/get"
mkdir -p "$R/floor" "$GET"
for m in "${METHODS[@]}"; do
    case $m in
    pitr-*) mkdir -p "$R/$m" ;;
    pgbr-*)
        c=${m#pgbr-}
        pgbr_conf "$BT/pgbr-$c.conf" "$R/pgbr-$c" "$PGDATA" "$PORT" "$c"
        as_pg pgbackrest --config="$BT/pgbr-$c.conf" --stanza=bench stanza-create >"$BT/log/stanza-$c.log" 2>&1
        ;;
    esac
done
chown -R postgres:postgres "$R" "$GET"

push_cmd() { # method segment-path
    case $1 in
    pitr-lz4) echo "$PITR" --repo "$R/pitr-lz4" --compression lz4 archive-push "$2" ;;
    pitr-zstd) echo "$PITR" --repo "$R/pitr-zstd" --compression zstd archive-push "$2" ;;
    pitr-base-*) echo "$PITR_BASE" --repo "$R/$1" --compression "${1#pitr-base-}" archive-push "$2" ;;
    pgbr-*) echo pgbackrest --config="$BT/pgbr-${1#pgbr-}.conf" --stanza=bench archive-push "$2" ;;
    esac
}
get_cmd() { # method segment-name dest
    case $1 in
    floor) echo cp "$R/floor/$2" "$3" ;;
    pitr-base-*) echo "$PITR_BASE" --repo "$R/$1" archive-get --prefetch 0 "$2" "$3" ;;
    pitr-*) echo "$PITR" --repo "$R/$1" archive-get --prefetch 0 "$2" "$3" ;;
    pgbr-*) echo pgbackrest --config="$BT/pgbr-${1#pgbr-}.conf" --stanza=bench archive-get "$2" "$3" ;;
    esac
}

M=${#METHODS[@]}

# Paths contain no spaces (mktemp under /tmp), so word splitting of the echoed commands is safe
# except for the floor's sh -c script, which is rebuilt here as an array.
run_push() { # method seg
    local m=$1 seg=$2
    if [[ $m == floor ]]; then
        measure "push/$m" "$seg" sh -c 'cp "$1" "$2.tmp" && sync "$2.tmp" && mv "$2.tmp" "$2" && sync "$3"' floor "$SRC/$seg" "$R/floor/$seg" "$R/floor"
    else
        # shellcheck disable=SC2046
        MEASURE_CWD=$PUSH_CWD measure "push/$m" "$seg" $(push_cmd "$m" "$SRC/$seg")
    fi
}
run_get() { # method seg
    local m=$1 seg=$2 dest="$GET/$1/RECOVERYXLOG"
    mkdir -p "$GET/$m" && chown postgres:postgres "$GET/$m"
    rm -f "$dest"
    # shellcheck disable=SC2046
    measure "get/$m" "$seg" $(get_cmd "$m" "$seg" "$dest")
    cmp -s "$dest" "$SRC/$seg" || die "get/$m returned different bytes for $seg"
    rm -f "$dest"
}

PUSH_CWD=""
[[ ${PUSH_IN_PGDATA:-0} == 1 ]] && PUSH_CWD=$PGDATA
log "warm-up: $WARM into every repository"
for m in "${METHODS[@]}"; do
    run_push "$m" "$WARM"
    run_get "$m" "$WARM"
done
: >"$BT/results.jsonl"

load0=$(cut -d' ' -f1-3 /proc/loadavg)
log "archive-push: $N segments x $M methods, interleaved"
for i in "${!SEGS[@]}"; do
    warm_memory "$W" $((M * 16777216))
    for j in $(seq 0 $((M - 1))); do
        run_push "${METHODS[$(((i + j) % M))]}" "${SEGS[$i]}"
    done
done
# Drop the page cache of the repositories? No: on a real server the archive was written moments
# or hours before; we keep it warm for all methods alike and say so in docs/benchmarks.md.
log "archive-get: $N segments x $M methods, interleaved"
for i in "${!SEGS[@]}"; do
    warm_memory "$W" $((M * 16777216))
    for j in $(seq 0 $((M - 1))); do
        run_get "${METHODS[$(((i + j) % M))]}" "${SEGS[$i]}"
    done
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)

pg_stop "$PGDATA"

{
    echo
    echo "## archive.sh results ($WORKLOAD WAL): $N segments of 16 MiB, median per segment"
    echo
    sed 's/^/    /' "$BT/machine.txt"
    echo "    loadavg during run: $load0 -> $load1; ROUND_WARM=$ROUND_WARM ARCHIVE_FS=$ARCHIVE_FS"
    quiet=()
    [[ " ${METHODS[*]} " == *" floor "* ]] && quiet=(--quiet floor)
    report --prefix push/ --ref "$REF" --floor floor --mb 16.777216 --title "archive-push (x $REF)" "${quiet[@]}"
    report --prefix get/ --ref "$REF" --floor floor --mb 16.777216 --title "archive-get (x $REF)"
    echo
    echo "### repository size after $((N + 1)) segments ($((16 * (N + 1))) MiB of WAL)"
    echo
    echo "| method | MiB | ratio |"
    echo "|---|---|---|"
    raw=$((16384 * (N + 1))) # KiB of WAL, when the floor was not run
    [[ " ${METHODS[*]} " == *" floor "* ]] && raw=$(du -sk "$R/floor" | cut -f1)
    for m in "${METHODS[@]}"; do
        k=$(du -sk "$R/$m" | cut -f1)
        awk -v m="$m" -v k="$k" -v raw="$raw" 'BEGIN {printf "| %s | %.1f | %.3f |\n", m, k / 1024, k / raw}'
    done
} | tee "$BT/report.md"
if [[ -n "${BENCH_OUT:-}" ]]; then cp "$BT/report.md" "$BENCH_OUT"; cp "$BT/results.jsonl" "${BENCH_OUT%.md}.jsonl"; fi

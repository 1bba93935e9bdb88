#!/usr/bin/env bash
# Benchmark (issue 12): `pitr verify --full` against `pg_waldump --quiet` over the very same WAL
# segments, on two workloads, interleaved, as paired ratios.
#
#   bench/verify.sh [SEGMENTS] [RUNS]   (defaults: 64 segments per workload, 3 runs)
#   WORKLOADS="tpcb insert"             which WAL (bench/lib.sh generators), in this order
#   BASE=/path/to/pitr                  also time that binary (e.g. the previous commit's build)
#   PITR=/path/to/pitr                  use this binary instead of building
#   KEEP=DIR                            keep each workload's raw segments and repository in DIR/W
#   REUSE=DIR                           take them from DIR/W (made by KEEP) instead of generating
#
# What is compared, per workload, in each of RUNS rounds (page cache warm, the readers in turn):
#   - pitr verify --full --json: LIST the repository, read every WAL object and its summary,
#     check each frame (header CRC, payload CRC-32C), lz4-decode, check the content CRC-32C, the
#     first page header, then every record: page headers, xl_tot_len, rmgr, xl_prev chain, CRC-32C,
#     block headers, with the record crossing each segment boundary checked whole; the stored
#     summaries parsed, each segment's summary rebuilt from its records. Run as is (its default
#     parallelism) and under `taskset -c 0` (one CPU).
#   - pg_waldump --quiet FIRST LAST over the raw segments (what PostgreSQL itself checks:
#     page headers, xl_tot_len, rmgr, xl_prev, CRC-32C, block headers), printing nothing.
# Wall time, CPU time (user+sys of the process tree, getrusage) and peak RSS of every run go to
# results.jsonl; the table gives medians and the paired ratio (each run / pg_waldump's run of the
# same round). Run as root (PostgreSQL runs as postgres).
source "$(dirname "$0")/lib.sh"

SEGMENTS=${1:-64}
RUNS=${2:-3}
WORKLOADS=${WORKLOADS:-tpcb insert}

NEED_PGBR=0 bench_init verify
machine_info

# Raw segments of workload $1 into $BT/$1/raw, pushed in order into $BT/$1/repo (lz4).
prepare() { # workload
    local w=$1 dir="$BT/$1"
    mkdir -p "$dir"
    if [[ -n "${REUSE:-}" ]]; then
        log "$w: reusing $REUSE/$w"
        cp -a "$REUSE/$w/raw" "$REUSE/$w/repo" "$dir/"
    else
        "${w}_archived_segments" "$SEGMENTS"
        pg_stop "$PGDATA"
        mv "$SRC" "$dir/raw"
        rm -rf "$PGDATA"
        log "$w: archive-push of $(ls "$dir/raw" | wc -l) segments"
        local seg
        for seg in $(ls "$dir/raw" | grep -E '^[0-9A-F]{24}$' | sort); do
            "$PITR" --repo "$dir/repo" --log-level warn archive-push "$dir/raw/$seg"
        done
        if [[ -n "${KEEP:-}" ]]; then
            mkdir -p "$KEEP/$w" && cp -a "$dir/raw" "$dir/repo" "$KEEP/$w/"
        fi
    fi
    chown -R postgres:postgres "$dir"
}

bench_workload() { # workload
    local w=$1 dir="$BT/$1"
    local segs first last n mb
    segs=$(ls "$dir/raw" | grep -E '^[0-9A-F]{24}$' | sort)
    first=$(echo "$segs" | head -1)
    last=$(echo "$segs" | tail -1)
    n=$(echo "$segs" | wc -l)
    mb=$((n * 16 * 1048576 / 1000000))
    cat "$dir"/raw/* "$dir"/repo/wal/*/* >/dev/null # warm the page cache for every reader
    local stored
    stored=$(du -sm "$dir/repo/wal" | cut -f1)
    echo
    echo "## $w: $n segments ($((n * 16)) MiB), $first .. $last; repository $stored MiB (lz4)"
    local r
    for r in $(seq 1 "$RUNS"); do
        log "$w round $r/$RUNS, loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "round $r: loadavg before $(cut -d' ' -f1-3 /proc/loadavg)"
        measure "$w-pitr" "$r" "$PITR" --repo "$dir/repo" verify --full --json
        measure "$w-pitr-1cpu" "$r" taskset -c 0 "$PITR" --repo "$dir/repo" verify --full --json
        if [[ -n "$PITR_BASE" ]]; then
            measure "$w-base" "$r" "$PITR_BASE" --repo "$dir/repo" verify --full --json
            measure "$w-base-1cpu" "$r" taskset -c 0 "$PITR_BASE" --repo "$dir/repo" verify --full --json
        fi
        measure "$w-waldump-q" "$r" "$PGBIN/pg_waldump" --quiet -p "$dir/raw" "$first" "$last"
    done
    # Both read the same records: pitr's count against the lines pg_waldump prints.
    as_pg "$PITR" --repo "$dir/repo" verify --full --json >"$BT/$w-verify.json" || true
    local records errors dump_records
    records=$(python3 -c "import json;print(json.load(open('$BT/$w-verify.json'))['wal_records'])")
    errors=$(python3 -c "import json;r=json.load(open('$BT/$w-verify.json'));print(sum(p['severity']=='error' for p in r['problems']))")
    dump_records=$("$PGBIN/pg_waldump" -p "$dir/raw" "$first" "$last" 2>/dev/null | wc -l)
    echo "records: pitr $records ($errors errors), pg_waldump $dump_records"
    report --prefix "$w-" --ref waldump-q --mb "$mb" --title "$w: verify --full vs pg_waldump --quiet ($n segments, $RUNS runs)"
}

for w in $WORKLOADS; do prepare "$w"; done
for w in $WORKLOADS; do bench_workload "$w"; done
echo
echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)"

#!/usr/bin/env bash
# archive-get as recovery calls it, with the prefetch spool (the default) and without
# (--prefetch 0), in one run.
#
#   sudo bench/prefetch.sh                       # N=30 segments, 3 rounds per mode, 100 ms apart
#   N=40 ROUNDS=5 GAP=0.05 sudo bench/prefetch.sh
#
# Generates real 16 MiB WAL segments with pgbench on a throwaway cluster (archived by `cp` into a
# source directory) and archives N of them with `pitr archive-push` (lz4, local repository). Then
# each round replays them the way PostgreSQL's startup process asks for them: from a data
# directory (PG_VERSION, recovery.signal, global/pg_control, pg_wal/), `archive-get %f
# pg_wal/RECOVERYXLOG` for each segment in order, the file checked and taken away as PostgreSQL
# does, with GAP seconds between calls standing in for replay. Rounds alternate prefetch on / off
# (on first in odd rounds), each in a fresh data directory; after an "on" round recovery.signal is
# removed and the worker must take the spool away before the next round starts.
#
# Reports per-call wall time (what replay waits for) and CPU of archive-get itself, per mode, with
# paired ratios (same segment, same round), the wall time per round, and the CPU the detached
# worker used (read from /proc before it exits; it is not a child measure.py waits for).

#
#   MODE=replay sudo bench/prefetch.sh           # real PostgreSQL recovery instead (issue 12)
#   MODE=replay WORKLOAD=insert sudo bench/prefetch.sh    # WAL of md5 text inserts instead of TPC-B
#   MODE=replay BASE=/path/to/old/pitr sudo bench/prefetch.sh   # adds mode "base": that build, prefetch on
#
# MODE=replay: a base backup (pg_basebackup -X none) of a pgbench -s 10 cluster, then N segments
# of TPC-B WAL, all archived with `pitr archive-push`; then ROUNDS rounds per mode (prefetch on =
# pitr's default, off = --prefetch 0, alternating which goes first) of real archive recovery:
# the backup copied into a fresh data directory, recovery.signal, restore_command = a wrapper
# that runs `pitr archive-get` and logs the wall time of each call (monotonic ns before and
# after) and what pitr logged (--log-level debug: "restored from the prefetch spool", "waited for
# the prefetch worker", "restored"). PostgreSQL's startup process runs restore_command
# synchronously, so the time in those calls is exactly the time replay waited for the archive;
# the rest of the recovery (first call to promotion) is replay itself. Reported per round:
# calls, time in restore_command, the recovery's wall time (first call to
# pg_is_in_recovery() = f), spool hits, hits that waited for the worker, direct fetches, the
# median wall and CPU of a segment call, PostgreSQL's "redo done" CPU and elapsed time, and the
# startup process's time on a CPU and waiting for one (/proc/PID/schedstat): on a loaded machine
# the latter, not restore_command, is often most of the recovery.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=${N:-30}
ROUNDS=${ROUNDS:-3}
GAP=${GAP:-0.1}

bench_init prefetch
machine_info | tee "$BT/machine.txt" >&2
if [[ ${MODE:-calls} == replay ]]; then
    source "$(dirname "${BASH_SOURCE[0]}")/prefetch_replay.sh"
    exit 0
fi

tpcb_archived_segments $((N + 1))
pg_stop "$PGDATA"
# N consecutive segments of the TPC-B run: replay asks for them one after the other.
mapfile -t SEGS < <(find "$SRC" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' -printf '%f\n' | sort | tail -n "$N")
log "segments: ${SEGS[0]} .. ${SEGS[-1]} ($N)"

REPO="$BT/repo"
mkdir -p "$REPO" && chown postgres:postgres "$REPO"
log "archiving them with pitr archive-push (lz4)"
for s in "${SEGS[@]}"; do
    as_pg "$PITR" --repo "$REPO" --log-level warn archive-push "$SRC/$s"
done

# A data directory as restore_command sees it; the worker watches its recovery.signal.
fake_datadir() { # dir
    mkdir -p "$1/pg_wal" "$1/global"
    cp "$PGDATA/PG_VERSION" "$1/"
    cp "$PGDATA/global/pg_control" "$1/global/"
    : >"$1/recovery.signal"
    chown -R postgres:postgres "$1"
    chmod 0700 "$1"
}

CLK_TCK=$(getconf CLK_TCK)
worker_cpu_ms() { # spool: utime+stime of live workers of this spool, in ms
    local total=0 pid
    for pid in $(pgrep -f -- "prefetch-worker --spool $1" || true); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo $((total * 1000 / CLK_TCK))
}

: >"$BT/rounds.txt"
run_round() { # mode round
    local mode=$1 r=$2 dd="$BT/data-$1-$2" t0 t1 i=0
    fake_datadir "$dd"
    t0=$(date +%s.%N)
    for s in "${SEGS[@]}"; do
        if [[ $mode == off ]]; then
            MEASURE_CWD="$dd" measure "get/$mode" "$r:$i" "$PITR" --repo "$REPO" archive-get --prefetch 0 "$s" pg_wal/RECOVERYXLOG
        else
            MEASURE_CWD="$dd" measure "get/$mode" "$r:$i" "$PITR" --repo "$REPO" archive-get "$s" pg_wal/RECOVERYXLOG
        fi
        cmp -s "$dd/pg_wal/RECOVERYXLOG" "$SRC/$s" || die "get/$mode returned different bytes for $s"
        rm -f "$dd/pg_wal/RECOVERYXLOG"
        i=$((i + 1))
        sleep "$GAP"
    done
    t1=$(date +%s.%N)
    local cpu=0
    if [[ $mode == on ]]; then
        cpu=$(worker_cpu_ms "$dd/pg_wal/.pitr-prefetch")
        rm -f "$dd/recovery.signal"
        local deadline=$((SECONDS + 5))
        while [[ -e "$dd/pg_wal/.pitr-prefetch" ]] || pgrep -f -- "prefetch-worker --spool $dd/" >/dev/null; do
            ((SECONDS < deadline)) || die "the prefetch worker did not remove its spool at the end of recovery"
            sleep 0.05
        done
    fi
    echo "$mode $r $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", (b - a) * 1000}') $cpu" >>"$BT/rounds.txt"
    rm -rf "$dd"
}

# Warm-up: page cache of the repository and the binary, for both modes alike.
run_round off 0
run_round on 0
: >"$BT/results.jsonl"
: >"$BT/rounds.txt"

load0=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq 1 "$ROUNDS"); do
    if ((r % 2)); then order=(on off); else order=(off on); fi
    for m in "${order[@]}"; do
        log "round $r: prefetch $m"
        run_round "$m" "$r"
    done
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)

{
    echo
    echo "## prefetch.sh results: $N segments of 16 MiB, $ROUNDS rounds per mode, ${GAP}s between calls"
    echo
    sed 's/^/    /' "$BT/machine.txt"
    echo "    loadavg during run: $load0 -> $load1"
    report --prefix get/ --ref off --labels on,off --title "archive-get per call (x off = with prefetch / without)"
    echo
    echo "### per round: sum of call times (what replay waited for), wall time of the round, worker CPU"
    echo
    /usr/bin/python3 - "$BT/results.jsonl" "$BT/rounds.txt" "$N" <<'PY'
import json, sys, statistics
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rounds = [l.split() for l in open(sys.argv[2]) if l.strip()]
n = int(sys.argv[3])
print("| mode | round | calls ms (sum) | CPU of archive-get ms (sum) | worker CPU ms | round wall ms |")
print("|---|---|---|---|---|---|")
sums = {}
for mode, r, wall, wcpu in rounds:
    rs = [x for x in recs if x["label"] == "get/" + mode and x["key"].startswith(r + ":")]
    s = sum(x["wall_ms"] for x in rs)
    c = sum(x["cpu_ms"] for x in rs)
    sums.setdefault(mode, []).append((s, c + int(wcpu)))
    print("| %s | %s | %.0f | %.0f | %s | %s |" % (mode, r, s, c, wcpu if mode == "on" else "-", wall))
if "on" in sums and "off" in sums:
    on = statistics.median(s for s, _ in sums["on"]); off = statistics.median(s for s, _ in sums["off"])
    con = statistics.median(c for _, c in sums["on"]); coff = statistics.median(c for _, c in sums["off"])
    print()
    print("median over rounds: replay waited %.0f ms with prefetch, %.0f ms without (x %.2f); "
          "CPU including the worker %.0f ms vs %.0f ms (x %.2f), for %d segments"
          % (on, off, on / off, con, coff, con / coff, n))
PY
} | tee "$BT/report.md"
if [[ -n "${BENCH_OUT:-}" ]]; then cp "$BT/report.md" "$BENCH_OUT"; cp "$BT/results.jsonl" "${BENCH_OUT%.md}.jsonl"; fi

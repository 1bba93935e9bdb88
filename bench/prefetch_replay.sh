# shellcheck shell=bash
# MODE=replay part of bench/prefetch.sh (sourced by it, after bench_init): real PostgreSQL
# archive recovery with and without the archive-get prefetch; see the header of prefetch.sh.

_archiving_cluster
WORKLOAD=${WORKLOAD:-tpcb}
log "pgbench -i -s 10, base backup, then $WORKLOAD WAL until $N more segments are archived"
as_pg "$PGBIN/pgbench" -h "$BT/sock" -p "$PORT" -U postgres -i -s 10 -q postgres >"$BT/log/pgbench-init.log" 2>&1
[[ $WORKLOAD == insert ]] && psql_at "$PORT" "create table ins (id bigserial primary key, t text)" >/dev/null
as_pg "$PGBIN/pg_basebackup" -h "$BT/sock" -p "$PORT" -U postgres -D "$BT/base" -X none -c fast >"$BT/log/basebackup.log" 2>&1
base=$(count_segs)
deadline=$((SECONDS + 600))
while (($(count_segs) < base + N)); do
    ((SECONDS < deadline)) || die "WAL generation too slow"
    case $WORKLOAD in
    tpcb) as_pg "$PGBIN/pgbench" -h "$BT/sock" -p "$PORT" -U postgres -n -c 2 -j 2 -T 5 postgres >>"$BT/log/pgbench-run.log" 2>&1 ;;
    # The second WAL workload of issue 12 (as bench/lib.sh's insert_archived_segments).
    insert) psql_at "$PORT" "insert into ins (t) select md5(g::text) || ' ' || md5((g * 31)::text) from generate_series(1, 100000) g" >/dev/null ;;
    *) die "unknown WORKLOAD $WORKLOAD (tpcb or insert)" ;;
    esac
done
psql_at "$PORT" "select pg_switch_wal()" >/dev/null
sleep 2
pg_stop "$PGDATA"

REPO="$BT/repo"
mkdir -p "$REPO" && chown postgres:postgres "$REPO"
log "archiving $(ls "$SRC" | wc -l) files with pitr archive-push (lz4)"
for f in $(ls "$SRC" | sort); do
    as_pg "$PITR" --repo "$REPO" --log-level warn archive-push "$SRC/$f"
done

# restore_command: one line per call, "name start_ns end_ns rc outcome cpu_ms". cpu_ms: user +
# sys of the call's children (archive-get and the $(...) subshell around it) from bash's `times`
# builtin (getrusage(RUSAGE_CHILDREN), ms resolution, no fork), before and after the call.
cat >"$BT/bin/rc.sh" <<'SH'
#!/bin/bash
# rc.sh LOG PREFETCH(0|default) pitr repo %f %p
log=$1 pf=$2 pitr=$3 repo=$4 f=$5 p=$6
# One pair of files per log: PostgreSQL runs restore_command one call at a time.
tf=$log.times
children_ms() { # sets REPLY: the children's user + sys in ms, from a `times` output file
    local u s v m r
    { read -r _ _ && read -r u s; } <"$1"
    REPLY=0
    for v in "$u" "$s"; do # "0m1.234s"
        m=${v%%m*} r=${v#*m} && r=${r%s}
        REPLY=$((REPLY + m * 60000 + 10#${r%.*} * 1000 + 10#${r#*.}))
    done
}
times >"$tf.0"
# $EPOCHREALTIME (µs) rather than $(date +%s%N): a fork and exec of date inside the timed span
# added 2-4 ms to every call on this machine.
t0=${EPOCHREALTIME/./}000
if [[ $pf == 0 ]]; then
    out=$("$pitr" --repo "$repo" --log-level debug archive-get --prefetch 0 "$f" "$p" 2>&1)
else
    out=$("$pitr" --repo "$repo" --log-level debug archive-get "$f" "$p" 2>&1)
fi
rc=$?
t1=${EPOCHREALTIME/./}000
times >"$tf.1"
children_ms "$tf.0" && c0=$REPLY
children_ms "$tf.1" && c1=$REPLY
what=other
case $out in
*"waited for the prefetch worker"*) what=spool-waited ;;
*"restored from the prefetch spool"*) what=spool ;;
*"not in the repository"*) what=notfound ;;
*"restored"*) what=fetched ;;
esac
echo "$f $t0 $t1 $rc $what $((c1 - c0))" >>"$log"
printf '%s\n' "$out" >>"$log.out"
exit $rc
SH
chmod 0755 "$BT/bin/rc.sh"

: >"$BT/replay.txt"
replay_round() { # mode round
    local mode=$1 r=$2 dd="$BT/rep-$1-$2" pf=default port t_end bin=$PITR
    [[ $mode == off ]] && pf=0
    [[ $mode == base ]] && bin=$PITR_BASE
    rm -rf "$dd"
    cp -a "$BT/base" "$dd"
    rm -f "$dd/postmaster.pid" "$dd/postmaster.opts"
    port=$(free_port)
    {
        echo "port = $port"
        echo "restore_command = '$BT/bin/rc.sh $BT/calls-$mode-$r.txt $pf $bin $REPO %f %p'"
        echo "archive_mode = off"
    } >>"$dd/postgresql.auto.conf"
    : >"$dd/recovery.signal"
    : >"$BT/calls-$mode-$r.txt"
    chown -R postgres:postgres "$dd" "$BT/calls-$mode-$r.txt"
    # The worker logs into its spool, which it removes at the end of recovery: keep a copy. And
    # the startup process's /proc/PID/schedstat (ns on CPU, ns runnable but waiting for a CPU),
    # the last sample before it exits at the end of recovery (builtins only, no fork).
    (local pm="" sp="" c cl st
    while [[ ! -e "$BT/stop-$mode-$r" ]]; do
        cp "$dd/pg_wal/.pitr-prefetch/worker.log" "$BT/worker-$mode-$r.log" 2>/dev/null || true
        if [[ -z $pm ]]; then read -r pm <"$dd/postmaster.pid" 2>/dev/null || pm=""; fi
        if [[ -n $pm && -z $sp ]]; then
            kids=()
            # No newline at the end of that file: read fails but fills kids.
            read -r -a kids <"/proc/$pm/task/$pm/children" 2>/dev/null || true
            for c in "${kids[@]}"; do
                cl=""
                read -r -d '' cl <"/proc/$c/cmdline" 2>/dev/null || true
                [[ $cl == *startup* ]] && sp=$c
            done
        fi
        if [[ -n $sp ]]; then
            st=""
            read -r st <"/proc/$sp/schedstat" 2>/dev/null || true
            if [[ -n $st ]]; then echo "$st" >"$BT/sched-$mode-$r.txt"; fi
        fi
        sleep 0.05
    done) &
    pg_start "$dd"
    while [[ $(psql_at "$port" "select pg_is_in_recovery()" 2>/dev/null) != f ]]; do sleep 0.05; done
    t_end=$(date +%s%N)
    : >"$BT/stop-$mode-$r"
    wait
    pg_stop "$dd"
    echo "$mode $r $t_end" >>"$BT/replay.txt"
    rm -rf "$dd"
}

replay_round off 0 # warm-up: page cache of the repository and the binary
replay_round on 0
if [[ -n "$PITR_BASE" ]]; then replay_round base 0; fi
: >"$BT/replay.txt"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq 1 "$ROUNDS"); do
    # With BASE (another pitr build, prefetch on as well): on, base, off, rotating each round.
    if [[ -n "$PITR_BASE" ]]; then
        modes=(on base off)
        order=("${modes[@]:$(((r - 1) % 3))}" "${modes[@]:0:$(((r - 1) % 3))}")
    elif ((r % 2)); then order=(on off); else order=(off on); fi
    for m in "${order[@]}"; do
        log "replay round $r: prefetch $m"
        replay_round "$m" "$r"
    done
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)

{
    echo
    echo "## prefetch.sh MODE=replay: PostgreSQL archive recovery of $N segments of $WORKLOAD WAL, $ROUNDS rounds per mode"
    echo
    sed 's/^/    /' "$BT/machine.txt"
    echo "    loadavg during run: $load0 -> $load1"
    echo
    /usr/bin/python3 - "$BT" <<'PY'
import sys, statistics, os
bt = sys.argv[1]
rounds = [l.split() for l in open(os.path.join(bt, "replay.txt")) if l.strip()]
print("| mode | round | calls | segments restored | in restore_command ms | recovery wall ms | waited share | spool hits | of which waited (ms) | direct fetches | median call ms (segments) | median CPU ms (segments) | redo CPU / elapsed s | startup process on CPU / waiting for a CPU s | worker stopped because |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
import re
def worker_stops(mode, r):
    # The first reason the worker logged for stopping early (free space, errors), if any.
    try:
        text = open(os.path.join(bt, f"worker-{mode}-{r}.log")).read()
    except OSError:
        return "-"
    m = re.search(r"WARN .*?(prefetch stops|not prefetching).*?(reason=|error=)(.*)", text)
    return (m.group(3)[:90] + " ...") if m else "-"
def redo_usage(mode, r):
    # PostgreSQL's own "redo done at ... system usage: CPU: user: U s, system: S s, elapsed: E s":
    # the startup process's CPU (restore_command's children not included) and redo's wall time.
    try:
        text = open(os.path.join(bt, "log", f"rep-{mode}-{r}.log")).read()
    except OSError:
        return "-"
    m = re.search(r"redo done at .*CPU: user: ([0-9.]+) s, system: ([0-9.]+) s, elapsed: ([0-9.]+) s", text)
    return f"{float(m.group(1)) + float(m.group(2)):.2f} / {float(m.group(3)):.2f}" if m else "-"

def startup_sched(mode, r):
    # ns on a CPU and ns runnable but waiting for one, of the startup process (last sample).
    try:
        on_cpu, runq, _ = open(os.path.join(bt, f"sched-{mode}-{r}.txt")).read().split()
    except (OSError, ValueError):
        return "-"
    return f"{int(on_cpu) / 1e9:.2f} / {int(runq) / 1e9:.2f}"
agg = {}
calls_by = {}  # (mode, "hit" | "other") -> [(wall ms, cpu ms)] of segment calls, every round
for mode, r, t_end in rounds:
    calls = [l.split() for l in open(os.path.join(bt, f"calls-{mode}-{r}.txt")) if l.strip()]
    t_first = min(int(c[1]) for c in calls)
    inside = sum(int(c[2]) - int(c[1]) for c in calls) / 1e6
    wall = (int(t_end) - t_first) / 1e6
    segs = [c for c in calls if c[4] in ("spool", "spool-waited", "fetched")]
    seg_ms = [(int(c[2]) - int(c[1])) / 1e6 for c in segs]
    hits = sum(c[4] in ("spool", "spool-waited") for c in calls)
    waited = [c for c in calls if c[4] == "spool-waited"]
    waited_ms = sum((int(c[2]) - int(c[1])) / 1e6 for c in waited)
    fetched = sum(c[4] == "fetched" for c in calls)
    seg_cpu = [int(c[5]) for c in segs if len(c) > 5]
    for c in segs:
        kind = "hit" if c[4] == "spool" else "other"
        calls_by.setdefault((mode, kind), []).append(((int(c[2]) - int(c[1])) / 1e6, int(c[5]) if len(c) > 5 else None))
    cpu_med = f"{statistics.median(seg_cpu):.0f}" if seg_cpu else "-"
    agg.setdefault(mode, []).append((inside, wall, statistics.median(seg_ms) if seg_ms else 0))
    print(f"| {mode} | {r} | {len(calls)} | {len(segs)} | {inside:.0f} | {wall:.0f} | {inside / wall:.2f} | {hits} | {len(waited)} ({waited_ms:.0f}) | {fetched} | {statistics.median(seg_ms) if seg_ms else 0:.1f} | {cpu_med} | {redo_usage(mode, r)} | {startup_sched(mode, r)} | {worker_stops(mode, r) if mode != 'off' else '-'} |")
if "on" in agg and "off" in agg:
    med = lambda m, i: statistics.median(x[i] for x in agg[m])
    print()
    print(f"median over rounds: time in restore_command {med('on', 0):.0f} ms with prefetch, {med('off', 0):.0f} ms without; "
          f"recovery wall {med('on', 1):.0f} vs {med('off', 1):.0f} ms (x {med('on', 1) / med('off', 1):.2f}); "
          f"median call per segment {med('on', 2):.1f} vs {med('off', 2):.1f} ms")
    for (mode, kind), v in sorted(calls_by.items()):
        cpus = [c for _, c in v if c is not None]
        print(f"{mode}: {len(v)} {'spool hits (not waiting for the worker)' if kind == 'hit' else 'other segment calls'}, "
              f"median {statistics.median(w for w, _ in v):.1f} ms wall, "
              + (f"{statistics.median(cpus):.0f} ms CPU" if cpus else "CPU not recorded"))
    if "base" in agg:
        print(f"BASE build, prefetch on: time in restore_command {med('base', 0):.0f} ms, recovery wall {med('base', 1):.0f} ms, "
              f"median call per segment {med('base', 2):.1f} ms")
PY
} | tee "$BT/report.md"
if [[ -n "${BENCH_OUT:-}" ]]; then cp "$BT/report.md" "$BENCH_OUT"; fi

#!/usr/bin/env bash
# pitr against an object store 20 ms away (issue 12): backup, restore, stream catch-up and
# archive-push, each at 0 ms and at 20 ms of round-trip time, interleaved, in one run.
#
#   sudo bench/latency.sh                      # scale 20, 3 rounds, 20 segments, 10 ms each way
#   SCALE=30 REPS=3 N=20 DELAY_MS=10 PARTS="push backup restore stream" sudo bench/latency.sh
#   BENCH_OUT=/tmp/latency.md sudo bench/latency.sh
#   BASE=/path/to/old/pitr sudo bench/latency.sh   # also base-lat0 and base-lat20: that binary
#
# The object store is s3s-fs (~/.cargo/bin, as in the integration tests) on 127.0.0.1, behind
# two instances of bench/latency_proxy.py: one forwarding at once (lat0), one holding every
# byte DELAY_MS in each direction (lat20; 10 ms each way = 20 ms RTT) and charging one RTT per
# new connection, as a TCP handshake would. Both methods go through a proxy, so the proxy's own
# cost is on both sides of every ratio. The kernel here has no sch_netem, so no `tc netem`. The
# RTT each proxy adds is measured first (`latency_proxy.py ping`: HEAD / on one connection).
#
# One PostgreSQL 15 cluster: pgbench -i -s SCALE is the database; archive_command copies each
# segment into $BT/src and archive-pushes it into the backup repositories straight to s3s-fs
# (not timed). Then, methods lat0 and lat20 alternating (order rotating each round):
#   push     N segments of that WAL, each pushed by a fresh `pitr archive-push` process into a
#            new repository per round (N processes per method and round), run in a stand-in
#            data directory of its own per method and round (PG_VERSION, global/pg_control) as
#            PostgreSQL runs archive_command in its data directory; the proxy counts the
#            connections, HTTP requests and exchanges of each push. Round trips per segment =
#            (median wall at 20 ms - median wall at 0 ms) / measured RTT: what the latency
#            costs, in RTTs.
#   backup   pitr backup of the database into s3://bench/backup-<method> (REPS rounds)
#   restore  pitr restore of that repository's newest backup into an empty directory (restore
#            command only; PostgreSQL not started)
#   stream   catch-up as in bench/stream.sh: receivers stopped, pgbench -i -s STREAM_SCALE writes
#            WAL, then each `pitr stream` alone (own slot, own repository) catches up to the same
#            LSN (its slot's restart_lsn), timed from start to then; CPU and peak RSS from
#            /usr/bin/time.
# Prints one table per part (median wall, CPU from getrusage, peak RSS, x lat0 ratios) and
# every run. BENCH_OUT=FILE copies the report (and the raw results next to it). TRACE_DIR=DIR
# keeps the proxies' traces, one line per request (time, connection, request line), as
# DIR/trace-lat0|lat20; the push report prints the sequence of one push per method from them.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCALE=${SCALE:-20}
STREAM_SCALE=${STREAM_SCALE:-$SCALE}
REPS=${REPS:-3}
N=${N:-20}
DELAY_MS=${DELAY_MS:-10}
PARTS=" ${PARTS:-push backup restore stream} "
METHODS=(lat0 lat20)
[[ -n "${BASE:-}" ]] && METHODS+=(base-lat0 base-lat20)
NEED_PGBR=0

S3FS=${S3S_FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
[[ -x $S3FS ]] || die "s3s-fs not found (cargo install s3s-fs --version 0.14.1 --features binary --locked)"

bench_init latency
_PIDS=()
_lat_cleanup() {
    local rc=$?
    set +e
    for p in "${_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    (exit $rc)
    _cleanup
}
trap _lat_cleanup EXIT
machine_info | tee "$BT/machine.txt" >&2

# ---- the object store and the proxies ------------------------------------------------------
S3PORT=$(free_port)
mkdir -p "$BT/s3/bench"
"$S3FS" --host 127.0.0.1 --port "$S3PORT" --access-key bench --secret-key benchsecret "$BT/s3" >"$BT/log/s3s-fs.log" 2>&1 &
_PIDS+=($!)
declare -A PPORT
start_proxy() { # method delay_ms
    rm -f "$BT/$1.port"
    python3 "$BENCH_DIR/latency_proxy.py" serve --upstream "127.0.0.1:$S3PORT" --delay-ms "$2" \
        --port-file "$BT/$1.port" --stats "$BT/$1.stats" --trace "$BT/trace-$1" >"$BT/log/proxy-$1.log" 2>&1 &
    _PIDS+=($!)
    local i
    for ((i = 0; i < 100; i++)); do [[ -s "$BT/$1.port" ]] && break; sleep 0.05; done
    PPORT[$1]=$(cat "$BT/$1.port")
}
start_proxy lat0 0
start_proxy lat20 "$DELAY_MS"
for ((i = 0; i < 100; i++)); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $S3PORT))" 2>/dev/null && break
    sleep 0.1
done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
endpoint() { echo "AWS_ENDPOINT_URL=http://127.0.0.1:${PPORT[${1#base-}]:-$S3PORT}"; }
bin_of() { [[ $1 == base-* ]] && echo "$PITR_BASE" || echo "$PITR"; }
PROXIES=(lat0 lat20)
{
    for m in "${PROXIES[@]}"; do
        echo "    $m (one-way delay $([[ $m == lat0 ]] && echo 0 || echo "$DELAY_MS") ms): $(python3 "$BENCH_DIR/latency_proxy.py" ping --port "${PPORT[$m]}")"
    done
} | tee "$BT/ping.txt" >&2
RTT_MS=$(awk '/lat20/ {for (i = 1; i <= NF; i++) if ($i == "median") print $(i + 1)}' "$BT/ping.txt")
RTT0_MS=$(awk '/lat0/ {for (i = 1; i <= NF; i++) if ($i == "median") print $(i + 1)}' "$BT/ping.txt")

# ---- the cluster ----------------------------------------------------------------------------
PORT=$(free_port)
PGDATA="$BT/pg"
SRC="$BT/src"
mkdir -p "$SRC" "$BT/restore"
CONN="host=$BT/sock port=$PORT user=postgres"
DIRECT="$(endpoint direct)"
ARCHIVE_CMD="cp %p $SRC/%f.tmp && mv $SRC/%f.tmp $SRC/%f"
for m in "${METHODS[@]}"; do
    ARCHIVE_CMD+=" && $DIRECT $(bin_of "$m") --repo s3://bench/backup-$m archive-push %p"
done
pg_start_archiving "$PGDATA" "$PORT" "$ARCHIVE_CMD"
pgbench() { as_pg "$PGBIN/pgbench" -h "$BT/sock" -p "$PORT" -U postgres "$@" postgres >>"$BT/log/pgbench.log" 2>&1; }
switch_and_wait_archived() {
    local seg deadline=$((SECONDS + 900))
    seg=$(psql_at "$PORT" "select pg_walfile_name(pg_switch_wal())")
    until [[ "$(psql_at "$PORT" "select coalesce(last_archived_wal, '') >= '$seg' from pg_stat_archiver")" == t ]]; do
        ((SECONDS < deadline)) || die "WAL $seg not archived after 900 s (see $BT/log/pg.log)"
        sleep 0.2
    done
}
log "database: pgbench -i -s $SCALE, then TPC-B for 10 s"
pgbench -i -s "$SCALE" -q
pgbench -n -c 2 -j 2 -T 10
if [[ $PARTS == *" push "* ]]; then
    # enough segments to push: more TPC-B with batched UPDATEs (full-page images, index entries)
    aid=1
    while (($(count_segs) < N + 2)); do
        pgbench -n -c 2 -j 2 -T 2
        psql_at "$PORT" "update pgbench_accounts set abalance = abalance + 1 where aid >= $aid and aid < $((aid + 100000))" >/dev/null
        aid=$(((aid + 100000) % (SCALE * 100000)))
    done
fi
psql_at "$PORT" "checkpoint" >/dev/null
switch_and_wait_archived
DB_BYTES=$(psql_at "$PORT" "select sum(pg_database_size(datname))::bigint from pg_database")
DB_MB=$(awk -v b="$DB_BYTES" 'BEGIN {print b / 1e6}')
log "database $((DB_BYTES / 1000000)) MB"

pitr_as() { # method args... -> the command words running pitr through that method's proxy
    local m=$1; shift
    echo env "$(endpoint "$m")" "$(bin_of "$m")" "$@"
}
order() { # round -> the methods, rotated
    local r=$1 j
    for ((j = 0; j < ${#METHODS[@]}; j++)); do echo "${METHODS[$(((r - 1 + j) % ${#METHODS[@]}))]}"; done
}
stats_of() { # method -> "connections exchanges GET PUT HEAD POST DELETE"
    sleep 0.06 # the proxy rewrites its stats file every 20 ms
    python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); r = c["requests"]
print(c["connections"], c["exchanges"], *(r.get(k, 0) for k in ("GET", "PUT", "HEAD", "POST", "DELETE")))' "$BT/$1.stats"
}
LOADS=()

# ---- push -----------------------------------------------------------------------------------
push_part() {
    local segs r i m before after d tb ta
    mapfile -t segs < <(find "$SRC" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' | sort | tail -n $((N + 1)) | head -n "$N")
    ((${#segs[@]} == N)) || die "only ${#segs[@]} segments in $SRC, need $N"
    log "push: $N segments x ${METHODS[*]} x $REPS rounds"
    : >"$BT/push-requests.txt"
    : >"$BT/push-trace.txt"
    LOADS+=("push $(cut -d' ' -f1-3 /proc/loadavg)")
    for ((r = 1; r <= REPS; r++)); do
        # Each method and round pushes from its own stand-in data directory (PG_VERSION and
        # global/pg_control of the cluster), as PostgreSQL runs archive_command in its data
        # directory: pitr keeps its marker and push cache there.
        for m in "${METHODS[@]}"; do
            d="$BT/pgd/$m-$r"
            mkdir -p "$d/global"
            cp "$PGDATA/PG_VERSION" "$d/" && cp "$PGDATA/global/pg_control" "$d/global/"
            chown -R postgres:postgres "$BT/pgd"
        done
        for ((i = 0; i < N; i++)); do
            for m in $(order $((r + i))); do
                before=$(stats_of "${m#base-}")
                tb=$(wc -l <"$BT/trace-${m#base-}")
                # shellcheck disable=SC2046
                MEASURE_CWD="$BT/pgd/$m-$r" measure "push/$m" "$r-$i" $(pitr_as "$m" --repo "s3://bench/push-$m-$r" archive-push "${segs[$i]}")
                after=$(stats_of "${m#base-}")
                ta=$(wc -l <"$BT/trace-${m#base-}")
                echo "$m $r-$i $before $after" >>"$BT/push-requests.txt"
                echo "$m $r-$i $tb $ta" >>"$BT/push-trace.txt"
            done
        done
    done
    LOADS+=("push done $(cut -d' ' -f1-3 /proc/loadavg)")
}
push_report() {
    report --prefix push/ --ref lat0 --title "archive-push of one 16 MiB segment (x lat0 = time ratio)"
    echo
    echo "Requests per push, counted at the proxy (median over every push of the method; the first"
    echo "push of a round creates the repository): connections, exchanges, GET, PUT, HEAD, POST, DELETE."
    echo
    echo "| method | connections | exchanges | GET | PUT | HEAD | POST | DELETE | first push: exchanges |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for m in "${METHODS[@]}"; do
        awk -v m="$m" '$1 == m {n++; for (k = 0; k < 7; k++) v[k, n] = $(10 + k) - $(3 + k); first = ($2 ~ /-0$/) ? first " " v[1, n] : first}
            function med(k,   i, j, t, a) {for (i = 1; i <= n; i++) a[i] = v[k, i]
                for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] > a[j]; j--) {t = a[j]; a[j] = a[j-1]; a[j-1] = t}
                return n % 2 ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2}
            END {printf "| %s |", m; for (k = 0; k < 7; k++) printf " %s |", med(k); printf "%s |\n", first}' "$BT/push-requests.txt"
    done
    echo
    echo "The requests of one push into an existing repository (round 1, the 4th segment) per method, as"
    echo "the proxy saw them: ms after the push's first request, connection number, request line."
    echo
    for m in "${METHODS[@]}"; do
        read -r _ _ tb ta < <(awk -v m="$m" '$1 == m && $2 == "1-3"' "$BT/push-trace.txt")
        echo "    $m:"
        sed -n "$((tb + 1)),${ta}p" "$BT/trace-${m#base-}" |
            awk 'NR == 1 {t0 = $1} {line = ""; for (k = 4; k <= NF; k++) line = line " " $k; q = index(line, "?"); if (q) line = substr(line, 1, q - 1); printf "      +%6.1f ms  conn %s%s\n", ($1 - t0) * 1000, $3, line}'
    done
    echo
    python3 - "$BT/results.jsonl" "$RTT_MS" "$RTT0_MS" <<'PY'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rtt = float(sys.argv[2]) - float(sys.argv[3])
print("Round trips per push = extra wall time at lat20 / the RTT the proxy adds (%.1f ms):" % rtt)
for b in ("", "base-"):
    w = {m: {r["key"]: r["wall_ms"] for r in recs if r["label"] == "push/" + b + m} for m in ("lat0", "lat20")}
    if not w["lat0"]:
        continue
    paired = [(w["lat20"][k] - w["lat0"][k]) / rtt for k in w["lat20"] if k in w["lat0"]]
    later = [(w["lat20"][k] - w["lat0"][k]) / rtt for k in w["lat20"] if k in w["lat0"] and not k.endswith("-0")]
    med = (statistics.median(w["lat20"].values()) - statistics.median(w["lat0"].values())) / rtt
    print("- %s: %.2f (difference of medians); paired per segment: median %.2f, pushes into an"
          " existing repository only: median %.2f" % (b + "pitr" if b else "pitr", med,
          statistics.median(paired), statistics.median(later)))
PY
}

# ---- backup and restore ---------------------------------------------------------------------
backup_part() {
    local r m
    log "backup: ${METHODS[*]} x $REPS rounds"
    LOADS+=("backup $(cut -d' ' -f1-3 /proc/loadavg)")
    for ((r = 1; r <= REPS; r++)); do
        for m in $(order "$r"); do
            log "  round $r: backup $m"
            # the conninfo has spaces: no word splitting for it
            measure "backup/$m" "$r" env "$(endpoint "$m")" "$(bin_of "$m")" --repo "s3://bench/backup-$m" backup -d "$CONN"
        done
    done
    LOADS+=("backup done $(cut -d' ' -f1-3 /proc/loadavg)")
}
restore_part() {
    local r m d
    log "restore: ${METHODS[*]} x $REPS rounds"
    LOADS+=("restore $(cut -d' ' -f1-3 /proc/loadavg)")
    for ((r = 1; r <= REPS; r++)); do
        for m in $(order "$r"); do
            d="$BT/restore/$m-$r"
            mkdir -m 0700 "$d" && chown postgres:postgres "$d"
            log "  round $r: restore $m"
            # shellcheck disable=SC2046
            measure "restore/$m" "$r" $(pitr_as "$m" --repo "s3://bench/backup-$m" restore --pgdata "$d")
            rm -rf "$d"
        done
    done
    LOADS+=("restore done $(cut -d' ' -f1-3 /proc/loadavg)")
}

# ---- stream catch-up ------------------------------------------------------------------------
wait_slot() { # slot lsn
    until [[ "$(psql_at "$PORT" "select restart_lsn >= '$2' from pg_replication_slots where slot_name = '$1'")" == t ]]; do sleep 0.05; done
}
catchup() { # method round target bytes
    local m=$1 r=$2 target=$3 bytes=$4 t0 t1 pid child next tf="$BT/log/time.stream-$1-$2"
    t0=$(date +%s%N)
    as_pg /usr/bin/time -f '%e %U %S %M' -o "$tf" env "$(endpoint "$m")" "$(bin_of "$m")" --repo "s3://bench/stream-$m" \
        stream -d "$CONN" --slot "stream_${m//-/_}" --application-name "stream_${m//-/_}" >"$BT/log/stream-$m-$r.log" 2>&1 &
    pid=$!
    wait_slot "stream_${m//-/_}" "$target"
    t1=$(date +%s%N)
    # runuser -> time -> pitr (env execs it): signal the deepest descendant, wait for the wrapper
    child=$pid
    while next=$(pgrep -P "$child" | head -1) && [[ -n $next ]]; do child=$next; done
    kill -TERM "$child"
    local i
    for ((i = 0; i < 600; i++)); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$child" 2>/dev/null && { log "pitr stream did not stop within 60 s of SIGTERM"; kill -KILL "$child"; }
    wait "$pid" || true
    awk -v l="stream/$m" -v k="$r" -v w="$(((t1 - t0) / 1000))" \
        '{printf "{\"label\": \"%s\", \"key\": \"%s\", \"wall_ms\": %.1f, \"cpu_ms\": %.1f, \"user_ms\": %.1f, \"sys_ms\": %.1f, \"maxrss_kb\": %d, \"rc\": 0}\n", l, k, w / 1000, ($2 + $3) * 1000, $2 * 1000, $3 * 1000, $4}' \
        "$tf" >>"$BT/results.jsonl"
    echo "$m $r $bytes" >>"$BT/stream-bytes.txt"
}
stream_part() {
    local r m start target bytes
    : >"$BT/stream-bytes.txt"
    for m in "${METHODS[@]}"; do psql_at "$PORT" "select pg_create_physical_replication_slot('stream_${m//-/_}', true)" >/dev/null; done
    log "stream catch-up: pgbench -i -s $STREAM_SCALE per round, ${METHODS[*]} x $REPS rounds"
    LOADS+=("stream $(cut -d' ' -f1-3 /proc/loadavg)")
    for ((r = 1; r <= REPS; r++)); do
        start=$(psql_at "$PORT" "select pg_current_wal_lsn()")
        pgbench -i -s "$STREAM_SCALE" -q
        target=$(psql_at "$PORT" "select pg_current_wal_lsn() from (select pg_switch_wal()) s")
        bytes=$(psql_at "$PORT" "select '$target'::pg_lsn - '$start'::pg_lsn")
        switch_and_wait_archived # the archiver is idle while the receivers are timed
        log "  round $r: $((bytes / 1048576)) MiB to catch up"
        for m in $(order "$r"); do catchup "$m" "$r" "$target" "$bytes"; done
        psql_at "$PORT" "checkpoint" >/dev/null
    done
    LOADS+=("stream done $(cut -d' ' -f1-3 /proc/loadavg)")
}

[[ $PARTS == *" push "* ]] && push_part
[[ $PARTS == *" backup "* || $PARTS == *" restore "* ]] && backup_part
[[ $PARTS == *" restore "* ]] && restore_part
[[ $PARTS == *" stream "* ]] && stream_part

{
    echo
    echo "## Object store latency: s3s-fs behind latency_proxy.py, lat0 = 0 ms, lat20 = ${DELAY_MS} ms each way"
    echo
    sed 's/^/    /' "$BT/machine.txt"
    echo "    proxies, measured (HEAD / on one kept-alive connection):"
    cat "$BT/ping.txt"
    echo "    database: pgbench -i -s $SCALE + 10 s TPC-B, $((DB_BYTES / 1000000)) MB"
    for l in "${LOADS[@]}"; do echo "    loadavg at $l"; done
    if [[ $PARTS == *" push "* ]]; then push_report; fi
    if [[ $PARTS == *" backup "* || $PARTS == *" restore "* ]]; then
        report --prefix backup/ --ref lat0 --mb "$DB_MB" --title "backup, MB/s of the database's size (x lat0 = time ratio; throughput ratio is its inverse)"
    fi
    if [[ $PARTS == *" restore "* ]]; then
        report --prefix restore/ --ref lat0 --mb "$DB_MB" --title "restore, MB/s of the database's size (x lat0 = time ratio)"
    fi
    if [[ $PARTS == *" stream "* ]]; then
        SB=$(awk '{s += $3; n++} END {print s / n / 1e6}' "$BT/stream-bytes.txt")
        report --prefix stream/ --ref lat0 --mb "$SB" --title "stream catch-up of pgbench -i -s $STREAM_SCALE, ${SB%.*} MB of WAL (x lat0 = time ratio)"
    fi
    echo
    echo "Every run (wall ms):"
    echo
    python3 - "$BT/results.jsonl" <<'PY'
import json, sys
runs = {}
for l in open(sys.argv[1]):
    r = json.loads(l)
    runs.setdefault(r["label"], []).append("%s: %.0f" % (r["key"], r["wall_ms"]))
for label, xs in runs.items():
    print("    %s  %s" % (label, ", ".join(xs)))
PY
} | tee "$BT/report.md"
if [[ -n "${BENCH_OUT:-}" ]]; then cp "$BT/report.md" "$BENCH_OUT"; cp "$BT/results.jsonl" "${BENCH_OUT%.md}.jsonl"; fi
if [[ -n "${TRACE_DIR:-}" ]]; then cp "$BT"/trace-lat0 "$BT"/trace-lat20 "$TRACE_DIR/"; fi

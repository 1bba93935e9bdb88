# Shared helpers for the pitr benchmarks. Source it from bench/*.sh (bash, run as root).
#
# What it gives:
#   bench_init NAME      temp dir $BT (owned by postgres), cleanup trap, tools installed,
#                        pitr built in release mode and copied to $BT/bin/pitr ($PITR); with
#                        PITR=/path/to/pitr that binary is used instead of building, and with
#                        BASE=/path/to/pitr a second binary (e.g. the previous commit's build) is
#                        copied to $BT/bin/pitr-base ($PITR_BASE) for the pitr-base-* methods
#   wants_pgbr METHODS... true when one of the methods is a pgBackRest one (pgbr-*)
#   pg_init DIR PORT [postgresql.conf lines...]   initdb as postgres, sockets in $BT/sock only
#   pg_start DIR / pg_stop DIR                      (every started cluster is stopped on exit)
#   as_pg CMD...          run as the postgres user
#   measure LABEL KEY CMD...   run CMD as postgres, append wall/CPU/peak-RSS to $BT/results.jsonl
#   report ...            print the median table with ratios (see measure.py below)
#   machine_info          nproc, memory, CPU, kernel, PostgreSQL and pgBackRest versions
#   tpcb_archived_segments COUNT   a cluster archiving into $SRC, run until COUNT new segments
#
# Clusters use unix sockets under $BT/sock (listen_addresses = ''; backup_restore.sh's send
# part with SEND_VIA=tcp also listens on 127.0.0.1 only), repositories are local directories,
# so no cloud endpoint or metadata service is ever touched.

set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$BENCH_DIR/.." && pwd)"
PGBIN="${PGBIN:-}"
BT=""
_STARTED_CLUSTERS=()
_MOUNTS=()
_REPORTING_MIN_FREE=""

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

_cleanup() {
    local rc=$?
    set +e
    for d in "${_STARTED_CLUSTERS[@]}"; do
        if [[ -f "$d/postmaster.pid" ]]; then
            runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
        fi
    done
    for m in "${_MOUNTS[@]}"; do
        umount "$m" || umount -l "$m"
    done
    [[ -z "$_REPORTING_MIN_FREE" ]] || echo "$_REPORTING_MIN_FREE" >"$_REPORTING" 2>/dev/null
    if [[ -n "$BT" && -d "$BT" ]]; then
        if [[ -n "${BENCH_KEEP:-}" ]]; then
            log "BENCH_KEEP set: leaving $BT"
        else
            rm -rf "$BT"
        fi
    fi
    exit $rc
}

# A fresh ext4 file system (mkfs defaults: with a journal, as a database volume is made) in a
# sparse image of SIZE_GB under $BT, mounted on DIR through a loop device with direct I/O (the
# image's writes are not cached a second time). Unmounted on exit.
mount_scratch_fs() { # dir size_gb
    local img="$BT/$(basename "$1").img" dev
    truncate -s "$2G" "$img"
    mkfs.ext4 -q -F "$img"
    mkdir -p "$1"
    mount -o loop "$img" "$1"
    _MOUNTS+=("$1")
    dev=$(findmnt -no SOURCE "$1")
    losetup --direct-io=on "$dev" || log "warning: no direct I/O on $dev (the image is cached twice)"
}

# This VM hands free memory back to the host (virtio-balloon free page reporting) as soon as it
# is free (min_free_ms = 0), and touching it again costs 1-1.2 CPU s per 493 MB, in cp and dd
# as in pitr: a round would measure how long the machine was idle before it, and a tool that
# writes fewer bytes would look faster. While a bench runs, only memory free for 60 s is handed
# back (the setting is restored on exit), and each timed round starts with a warm-up (ROUND_WARM=1,
# the default): BYTES + 25 % of zeros written to a scratch file in DIR, deleted unsynced at once.
_REPORTING=/sys/module/page_reporting/parameters/min_free_ms
hold_host_memory() {
    [[ -w $_REPORTING ]] || return 0
    _REPORTING_MIN_FREE=$(cat "$_REPORTING")
    echo 60000 >"$_REPORTING" || _REPORTING_MIN_FREE=""
}
ROUND_WARM=${ROUND_WARM:-1}
warm_memory() { # dir bytes
    ((ROUND_WARM)) || return 0
    dd if=/dev/zero of="$1/.warm" bs=8M count=$(($2 + $2 / 4)) iflag=count_bytes status=none
    rm -f "$1/.warm"
}

_need_apt() { # package command
    command -v "$2" >/dev/null 2>&1 && return 0
    log "installing $1 (apt-get)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "$1" >/dev/null 2>&1; then
        apt-get update >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y "$1" >/dev/null
    fi
}

ensure_tools() {
    [[ $EUID -eq 0 ]] || die "run as root (PostgreSQL and pgBackRest run as the postgres user via runuser)"
    # pgBackRest is only needed when a pgbr-* method is selected (the caller says so)
    [[ ${NEED_PGBR:-1} == 1 ]] && _need_apt pgbackrest pgbackrest
    _need_apt time /usr/bin/time
    _need_apt python3 /usr/bin/python3
    if [[ -z "$PGBIN" ]]; then
        PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
    fi
    [[ -x "$PGBIN/initdb" ]] || die "PostgreSQL server binaries not found (set PGBIN=/usr/lib/postgresql/NN/bin)"
    [[ -x "$PGBIN/pgbench" ]] || die "pgbench not found in $PGBIN"
    id postgres >/dev/null 2>&1 || die "no postgres user (install the postgresql package)"
}

build_pitr() {
    if [[ -n "${PITR:-}" ]]; then
        [[ -x "$PITR" ]] || die "PITR=$PITR is not an executable"
        log "using PITR=$PITR (not building)"
        install -m 0755 "$PITR" "$BT/bin/pitr"
    else
        log "building pitr (cargo build --release)"
        (cd "$REPO_ROOT" && cargo build --release --quiet)
        install -m 0755 "$REPO_ROOT/target/release/pitr" "$BT/bin/pitr"
    fi
    PITR="$BT/bin/pitr"
    PITR_BASE=""
    if [[ -n "${BASE:-}" ]]; then
        [[ -x "$BASE" ]] || die "BASE=$BASE is not an executable"
        install -m 0755 "$BASE" "$BT/bin/pitr-base"
        PITR_BASE="$BT/bin/pitr-base"
    fi
}

wants_pgbr() { # methods... -> true when one of them is pgbr-*
    local m
    for m in "$@"; do [[ $m == pgbr-* ]] && return 0; done
    return 1
}

bench_init() { # name
    ensure_tools
    BT="$(mktemp -d "/tmp/pitr-bench-$1.XXXXXX")"
    chmod 0755 "$BT"
    trap _cleanup EXIT
    trap 'exit 130' INT TERM
    hold_host_memory
    mkdir -p "$BT/bin" "$BT/sock" "$BT/log"
    _write_measure_py
    build_pitr
    chown -R postgres:postgres "$BT"
    : >"$BT/results.jsonl"
    chown postgres:postgres "$BT/results.jsonl"
}

as_pg() { runuser -u postgres -- "$@"; }

free_port() {
    /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

pg_init() { # dir port [conf lines...]
    local dir=$1 port=$2; shift 2
    as_pg "$PGBIN/initdb" -D "$dir" -A trust -U postgres --no-instructions >"$BT/log/initdb-$(basename "$dir").log" 2>&1
    {
        echo "port = $port"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$BT/sock'"
        echo "logging_collector = off"
        echo "fsync = on"
        for line in "$@"; do echo "$line"; done
    } >>"$dir/postgresql.conf"
}

pg_start() { # dir [extra pg_ctl -o options]
    local dir=$1 opts=${2:-}
    _STARTED_CLUSTERS+=("$dir")
    as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$BT/log/$(basename "$dir").log" -o "$opts" -w -t 3600 start >/dev/null
}

# The benchmarks' source cluster: archiving with `archive_command`, checkpoints far apart, room
# for base backups and streams; initialized, handed to postgres and started.
pg_start_archiving() { # dir port archive_command
    pg_init "$1" "$2" \
        "wal_level = replica" \
        "archive_mode = on" \
        "archive_command = '$3'" \
        "max_wal_size = 2GB" \
        "checkpoint_timeout = 30min" \
        "shared_buffers = 128MB" \
        "max_wal_senders = 10"
    chown -R postgres:postgres "$BT"
    pg_start "$1"
}

pg_stop() { # dir
    as_pg "$PGBIN/pg_ctl" -D "$1" -m fast -w -t 600 stop >/dev/null
}

psql_at() { # port sql
    as_pg "$PGBIN/psql" -X -q -At -h "$BT/sock" -p "$1" -U postgres -d postgres -c "$2"
}

# pgBackRest configuration: pgbr_conf FILE REPO PGDATA PORT compress-type [extra lines...]
pgbr_conf() {
    local file=$1 repo=$2 pgdata=$3 port=$4 ctype=$5; shift 5
    local name; name="$(basename "$file" .conf)"
    mkdir -p "$repo" "$BT/pgbr-$name/log" "$BT/pgbr-$name/lock" "$BT/pgbr-$name/spool"
    {
        echo "[global]"
        echo "repo1-path=$repo"
        echo "repo1-retention-full=9999"
        echo "log-path=$BT/pgbr-$name/log"
        echo "lock-path=$BT/pgbr-$name/lock"
        echo "spool-path=$BT/pgbr-$name/spool"
        echo "log-level-console=warn"
        echo "log-level-file=off"
        echo "archive-async=n"
        echo "start-fast=y"
        echo "compress-type=$ctype"
        for line in "$@"; do echo "$line"; done
        echo "[bench]"
        echo "pg1-path=$pgdata"
        echo "pg1-port=$port"
        echo "pg1-socket-path=$BT/sock"
        echo "pg1-user=postgres"
    } >"$file"
    chown -R postgres:postgres "$repo" "$BT/pgbr-$name" "$file"
}

# measure LABEL KEY CMD... : run CMD as postgres; wall time, user+sys CPU (getrusage of the
# child and its waited-for descendants, microsecond resolution) and peak RSS go to results.jsonl.
# The child's output goes to $BT/log/measure.log; a non-zero exit fails the benchmark. It runs in
# $BT, or in $MEASURE_CWD when set (restore_command runs from the data directory).
measure() {
    /usr/bin/python3 "$BT/bin/measure.py" run "$BT/results.jsonl" "$@"
}

report() {
    /usr/bin/python3 "$BT/bin/measure.py" report "$BT/results.jsonl" "$@"
}

median_of() { # numbers... -> median
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'
}

machine_info() {
    echo "date:       $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "nproc:      $(nproc)"
    echo "memory:     $(free -h | awk '/^Mem:/ {print $2 " total, " $7 " available"}')"
    echo "cpu:        $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "lscpu:      $(lscpu 2>/dev/null | awk -F: '/^Model name/ {gsub(/^ +/, "", $2); m = $2} /^CPU\(s\)/ {gsub(/ /, "", $2); c = $2} END {print m ", " c " CPUs"}')"
    echo "kernel:     $(uname -r)"
    echo "postgres:   $("$PGBIN/postgres" --version)"
    echo "pgbackrest: $(pgbackrest version 2>/dev/null || echo 'not installed')"
    if [[ -n "${PITR_SRC:-}" ]]; then
        echo "pitr:       $PITR_SRC ($("$BT/bin/pitr" --version))"
    else
        echo "pitr:       $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') ($("$BT/bin/pitr" --version))"
    fi
    if [[ -n "${PITR_BASE:-}" ]]; then
        echo "pitr-base:  ${BASE_SRC:-$BASE} ($("$PITR_BASE" --version))"
    fi
    echo "filesystem: $(df -T "$BT" | awk 'NR==2 {print $2 " on " $1}')"
    echo "loadavg:    $(cut -d' ' -f1-3 /proc/loadavg)"
    [[ -z "$_REPORTING_MIN_FREE" ]] || echo "host memory: free page reporting min_free_ms $_REPORTING_MIN_FREE -> 60000 during the run"
}

_write_measure_py() {
    cat >"$BT/bin/measure.py" <<'PY'
import json, os, pwd, statistics, subprocess, sys, time

def run(path, label, key, cmd):
    pw = pwd.getpwnam("postgres")
    bt = os.path.dirname(path)
    logf = open(os.path.join(bt, "log", "measure.log"), "ab")
    logf.write(("\n### %s %s: %s\n" % (label, key, " ".join(cmd))).encode()); logf.flush()
    env = dict(os.environ, HOME=pw.pw_dir, USER="postgres", LOGNAME="postgres")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                         user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                         cwd=os.environ.get("MEASURE_CWD") or bt)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    rec = dict(label=label, key=key, wall_ms=wall * 1e3,
               cpu_ms=(ru.ru_utime + ru.ru_stime) * 1e3,
               user_ms=ru.ru_utime * 1e3, sys_ms=ru.ru_stime * 1e3,
               maxrss_kb=ru.ru_maxrss, rc=p.returncode)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if p.returncode != 0:
        sys.stderr.write("measure: %s %s exited %d: %s (see %s)\n"
                         % (label, key, p.returncode, " ".join(cmd), logf.name))
        sys.exit(1)

def q(xs, f):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    i = f * (len(xs) - 1); lo = int(i); hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)

def paired_ratio(by, l, ref, keys=None):
    # median over keys (segments / repetitions; all, or those in `keys`) of l's wall time / ref's
    rk = {r["key"]: r["wall_ms"] for r in by[ref]}
    xs = [r["wall_ms"] / rk[r["key"]] for r in by[l]
          if r["key"] in rk and (keys is None or r["key"] in keys)]
    return statistics.median(xs) if xs else float("nan")

def report(path, args):
    # report RESULTS [--prefix P] [--ref LABEL] [--floor LABEL] [--mb MB] [--labels a,b,c]
    opts = {"--prefix": "", "--ref": None, "--floor": None, "--mb": None, "--labels": None,
            "--title": None, "--quiet": None}
    it = iter(args)
    for a in it:
        opts[a] = next(it)
    recs = [json.loads(l) for l in open(path) if l.strip()]
    recs = [r for r in recs if r["label"].startswith(opts["--prefix"])]
    labels = []
    for r in recs:
        if r["label"] not in labels:
            labels.append(r["label"])
    if opts["--labels"]:
        labels = [opts["--prefix"] + l for l in opts["--labels"].split(",")]
    by = {l: [r for r in recs if r["label"] == l] for l in labels}
    med = {l: statistics.median(r["wall_ms"] for r in by[l]) for l in labels}
    cpu = {l: statistics.median(r["cpu_ms"] for r in by[l]) for l in labels}
    paired = lambda l, ref: paired_ratio(by, l, ref)
    if opts["--ref"] and opts["--prefix"] + opts["--ref"] not in by:
        opts["--ref"] = None  # the reference method was not run: no ratio columns
    if opts["--floor"] and opts["--prefix"] + opts["--floor"] not in by:
        opts["--floor"] = None
    mb = float(opts["--mb"]) if opts["--mb"] else None
    if opts["--title"]:
        print("\n### " + opts["--title"] + "\n")
    hdr = ["method", "n", "median ms", "p10-p90 ms", "CPU ms (median)", "peak RSS MiB"]
    if mb: hdr.append("MB/s")
    if opts["--floor"]: hdr.append("x floor")
    if opts["--ref"]: hdr += ["x " + opts["--ref"], "paired x " + opts["--ref"], "CPU x " + opts["--ref"]]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "|".join("---" for _ in hdr) + "|")
    for l in labels:
        w = [r["wall_ms"] for r in by[l]]
        row = [l[len(opts["--prefix"]):], str(len(w)), "%.1f" % med[l],
               "%.1f-%.1f" % (q(w, .1), q(w, .9)), "%.1f" % cpu[l],
               "%.1f" % (max(r["maxrss_kb"] for r in by[l]) / 1024)]
        if mb: row.append("%.1f" % (mb / (med[l] / 1e3)))
        if opts["--floor"]:
            row.append("%.2f" % (med[l] / med[opts["--prefix"] + opts["--floor"]]))
        if opts["--ref"]:
            ref = opts["--prefix"] + opts["--ref"]
            row += ["%.2f" % (med[l] / med[ref]), "%.2f" % paired(l, ref),
                    "%.2f" % (cpu[l] / cpu[ref]) if cpu[ref] > 0 else "-"]
        print("| " + " | ".join(row) + " |")
    if opts["--quiet"] and opts["--prefix"] + opts["--quiet"] in by:
        quiet_rounds(by, opts["--prefix"], opts["--quiet"], opts["--ref"])

def quiet_rounds(by, prefix, base, ref):
    # This VM has phases (seconds to minutes) in which every process pays ~35 ms more system
    # time per 16 MiB written: a round (key) is quiet when BASE's CPU is within 1.5x of its
    # lowest. Ratios per round, medians over the quiet rounds.
    b = {r["key"]: r for r in by[prefix + base]}
    low = min(r["cpu_ms"] for r in b.values())
    keys = [k for k, r in b.items() if r["cpu_ms"] <= 1.5 * low]
    print("\nQuiet rounds (%s CPU <= 1.5x its lowest, %.1f ms): %d of %d" % (base, low, len(keys), len(b)))
    print()
    cols = [base] + ([ref] if ref and ref != base else [])
    print("| method | median ms | " + " | ".join("paired x " + c for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for l, rs in by.items():
        rk = {r["key"]: r["wall_ms"] for r in rs}
        ks = [k for k in keys if k in rk]
        if not ks:
            continue
        row = [l[len(prefix):], "%.1f" % statistics.median(rk[k] for k in ks)]
        row += ["%.2f" % paired_ratio(by, l, prefix + c, set(ks)) for c in cols]
        print("| " + " | ".join(row) + " |")

if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        report(sys.argv[2], sys.argv[3:])
PY
}

# A throwaway PostgreSQL cluster whose archive_command copies each finished segment into $SRC,
# then pgbench -i -s 10 and TPC-B until COUNT more segments are there. A small max_wal_size
# makes checkpoints frequent, so the WAL carries the full-page images a busy OLTP server
# produces, not only small heap records. Sets PORT, PGDATA and SRC; the cluster keeps running.
count_segs() { find "$SRC" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' | wc -l; }
# A throwaway cluster that archives with cp into $SRC (PGDATA, PORT, SRC are set).
_archiving_cluster() {
    PORT=$(free_port)
    PGDATA="$BT/pg"
    SRC="$BT/src"
    mkdir -p "$SRC" && chown postgres:postgres "$SRC"
    pg_init "$PGDATA" "$PORT" \
        "wal_level = replica" \
        "archive_mode = on" \
        "archive_command = 'cp %p $SRC/%f.tmp && mv $SRC/%f.tmp $SRC/%f'" \
        "max_wal_size = 64MB" "min_wal_size = 32MB" \
        "synchronous_commit = off" \
        "shared_buffers = 128MB"
    pg_start "$PGDATA"
}

tpcb_archived_segments() { # count
    local count=$1
    _archiving_cluster
    log "generating WAL: pgbench -i -s 10, then TPC-B until $count more segments are archived"
    as_pg "$PGBIN/pgbench" -h "$BT/sock" -p "$PORT" -U postgres -i -s 10 -q postgres >"$BT/log/pgbench-init.log" 2>&1
    psql_at "$PORT" "checkpoint" >/dev/null
    local base deadline=$((SECONDS + 300))
    base=$(count_segs)
    while (($(count_segs) < base + count)); do
        ((SECONDS < deadline)) || die "WAL generation too slow: $(count_segs) segments after 300 s"
        as_pg "$PGBIN/pgbench" -h "$BT/sock" -p "$PORT" -U postgres -n -c 2 -j 2 -T 5 postgres >>"$BT/log/pgbench-run.log" 2>&1
    done
}

# The second WAL workload (issue 12): inserts of rows of md5 text, which compress less than
# TPC-B's WAL (full-page images of pgbench tables).
insert_archived_segments() { # count
    local count=$1
    _archiving_cluster
    log "generating WAL: inserts of md5 text rows until $count more segments are archived"
    psql_at "$PORT" "create table ins (id bigserial primary key, t text)" >/dev/null
    local base deadline=$((SECONDS + 300))
    base=$(count_segs)
    while (($(count_segs) < base + count)); do
        ((SECONDS < deadline)) || die "WAL generation too slow: $(count_segs) segments after 300 s"
        psql_at "$PORT" "insert into ins (t) select md5(g::text) || ' ' || md5((g * 31)::text) from generate_series(1, 100000) g" >/dev/null
    done
}

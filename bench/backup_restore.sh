#!/usr/bin/env bash
# Base backup throughput, PITR end to end, and peak RSS: pitr vs pg_basebackup vs pgBackRest.
#
#   sudo bench/backup_restore.sh                       # scale 50 (~750 MB), 3 repetitions
#   SCALE=50 SMALL_SCALE=10 REPS=3 REPLAY_MB=384 sudo bench/backup_restore.sh
#   BASE=/path/to/old/pitr BACKUP_METHODS="basebackup pitr pitr-base" BACKUP_REF=pitr-base \
#     RESTORE_METHODS="pitr pitr-base" sudo bench/backup_restore.sh   # two pitr builds side by side
#
# With BASE set, a second pitr binary (e.g. the previous commit's build) archives into its own
# repository too (its archive-push is added to archive_command), and the methods pitr-base
# (backup, and restore with its own archive-get as restore_command) time it like pitr.
# pgBackRest is set up (configuration, stanza, archive-push) only when a pgbr-* method is selected.
#
# One PostgreSQL 15 cluster archives every WAL segment into three repositories at once
# (archive_command = pitr archive-push && pgbackrest[lz4] archive-push && pgbackrest[gz]
# archive-push), so every tool has the WAL its backups and restores need.
#
# 1. Peak RSS at SMALL_SCALE: pitr backup, pitr restore (the cluster is then re-initialised
#    at SCALE, and the same is measured there as part of 2 and 3).
# 2. Backups at SCALE, REPS rounds, methods interleaved with the order rotating each round:
#      basebackup   pg_basebackup -Ft -X none -c fast (plain tar, no compression: the baseline)
#      pitr         pitr backup (lz4, the default)
#      pgbr-lz4     pgbackrest --type=full backup, compress-type=lz4, process-max=1
#      pgbr-lz4-p2  the same with process-max=2 (one per core)
#      pgbr-gz      pgBackRest's defaults (compress-type=gz level 6, process-max=1)
#    All use a fast checkpoint and wait until the backup's last WAL segment is archived.
#    MB/s = the database's size (bytes of pg_basebackup's base.tar) / wall time; MB = 10^6 bytes.
# 3. PITR end to end: after the backups, pgbench and UPDATEs write ~REPLAY_MB of WAL, time T is taken, more
#    commits follow, WAL is switched and archived, the source cluster is stopped. Then, REPS
#    rounds interleaved: restore to T, start PostgreSQL (pg_ctl start -w, hot_standby=off so
#    "ready" means recovery finished and the cluster was promoted), check it accepts connections
#    and is out of recovery. Methods: pitr restore --target-time T; pgbackrest restore
#    --type=time --target=T --target-action=promote (lz4 repository, process-max 1; and the gz
#    repository). Both replay through their own synchronous archive-get as restore_command.
#    Every restored cluster must hold the same number of pgbench_history rows.
# 4. Incremental backups, chain restore and delta restore (see "part 4" below for the steps).
#    PARTS="main incr" (the default) runs 1-3 then 4; PARTS=incr only 4 (pgbench -i at SCALE):
#      PARTS=incr SCALE=30 REPS=3 sudo bench/backup_restore.sh
# 5. Restore rate against the disk: pitr restore vs dd conv=fsync of the same bytes (see "part 5"
#    below). PARTS=rate runs only this (pgbench -i at SCALE; BASE adds pitr-base):
#      PARTS=rate SCALE=30 REPS=3 sudo bench/backup_restore.sh
# 6. Backup against the server's own send rate: pitr backup vs pg_basebackup -D - -Ft -X none
#    -c fast > /dev/null, on the cluster restarted without archiving (see "part 6" below). PARTS=send runs only this (BASE adds pitr-base):
#      PARTS=send SCALE=30 REPS=5 sudo bench/backup_restore.sh
#    SEND_VIA="unix tcp" measures over both the unix socket (default) and TCP on 127.0.0.1.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCALE=${SCALE:-50}
SMALL_SCALE=${SMALL_SCALE:-10}
REPS=${REPS:-3}
REPLAY_MB=${REPLAY_MB:-384}
BACKUP_METHODS=(${BACKUP_METHODS:-basebackup pitr pgbr-lz4 pgbr-lz4-p2 pgbr-gz})
RESTORE_METHODS=(${RESTORE_METHODS:-pitr pgbr-lz4 pgbr-gz})
SEND_VIA=${SEND_VIA:-unix}             # part 6's transports: unix, tcp, or "unix tcp"
PARTS=" ${PARTS:-main incr} "        # main = parts 1-3 below, incr = part 4, rate = part 5, send = part 6 (alone or with incr)
INCR_PGBR=${INCR_PGBR:-1}            # part 4 also times pgBackRest (lz4 repository)
CHANGE_PCT=${CHANGE_PCT:-2}
BACKUP_REF=${BACKUP_REF:-basebackup}
# Every restore here (parts 1, 3, 4 and 5) writes under $BT/restore, by default a fresh ext4
# file system with a journal (RESTORE_FS=loop: a sparse image of RESTORE_FS_GB on the same
# disk, loop device with direct I/O; RESTORE_FS=dir: a directory on /tmp's file system, as
# before 2026-12-05). This VM's root file system is ext4 without a journal, where creating a
# file skips every inode freed in the last 1-6 minutes (fs/ext4/ialloc.c, recently_deleted;
# only without a journal): a restore there pays for every earlier rm -rf (of the previous round,
# or of a previous bench run's temp dir) with a scan per file created, up to 45 % of its CPU in
# a perf profile, which dd, one file, never pays. On RESTORE_FS=dir each round's output in
# parts 3 and 5 is therefore kept until all rounds are done (ROUND_RM=end, the default there;
# ROUND_RM=each deletes it at once), dropped from the page cache (POSIX_FADV_DONTNEED) so that
# the next round reuses its memory.
# Each round of parts 3, 5 and 6 starts with a memory warm-up (lib.sh warm_memory, ROUND_WARM).
RESTORE_FS=${RESTORE_FS:-loop}
RESTORE_FS_GB=${RESTORE_FS_GB:-32}
if [[ $RESTORE_FS == loop ]]; then ROUND_RM=${ROUND_RM:-each}; else ROUND_RM=${ROUND_RM:-end}; fi

# Touch BYTES + 25 % of memory and free it again (BYTES unknown, as in part 5's first round: 1 GB).
round_warm() { warm_memory "$BT/restore" "${1:-800000000}"; }

# A round's output: deleted now (ROUND_RM=each) or moved aside, out of the page cache, until the
# rounds are over (round_kept_rm).
round_done() {
    if [[ $ROUND_RM == each ]]; then
        rm -rf "$1"
    else
        mkdir -p "$BT/restore/kept" && mv "$1" "$BT/restore/kept/$2"
        python3 - "$BT/restore/kept/$2" <<'PY'
import os, sys
root = sys.argv[1]
paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
for p in paths:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PY
    fi
}

round_kept_rm() { rm -rf "$BT/restore/kept"; }

for m in "${BACKUP_METHODS[@]}" "${RESTORE_METHODS[@]}"; do
    [[ $m != pitr-base || -n "${BASE:-}" ]] || die "method pitr-base needs BASE=/path/to/pitr"
done
USE_PGBR=0
[[ $PARTS == *" main "* ]] && wants_pgbr "${BACKUP_METHODS[@]}" "${RESTORE_METHODS[@]}" && USE_PGBR=1
[[ $PARTS == *" incr "* && $INCR_PGBR == 1 ]] && USE_PGBR=1
NEED_PGBR=$USE_PGBR

bench_init backup
machine_info | tee "$BT/machine.txt" >&2

PORT=$(free_port)
PGDATA="$BT/pg"
R="$BT/repos"
mkdir -p "$R/pitr" "$BT/bb" "$BT/restore"
if [[ $RESTORE_FS == loop ]]; then mount_scratch_fs "$BT/restore" "$RESTORE_FS_GB"; fi
CONN="host=$BT/sock port=$PORT user=postgres"
ARCHIVE_CMD="$PITR --repo $R/pitr archive-push %p"
if [[ -n "$PITR_BASE" ]]; then
    mkdir -p "$R/pitr-base"
    ARCHIVE_CMD+=" && $PITR_BASE --repo $R/pitr-base archive-push %p"
fi
if ((USE_PGBR)); then
    pgbr_conf "$BT/pgbr-lz4.conf" "$R/pgbr-lz4" "$PGDATA" "$PORT" lz4 "process-max=1"
    pgbr_conf "$BT/pgbr-gz.conf" "$R/pgbr-gz" "$PGDATA" "$PORT" gz
    ARCHIVE_CMD+=" && pgbackrest --config=$BT/pgbr-lz4.conf --stanza=bench archive-push %p"
    ARCHIVE_CMD+=" && pgbackrest --config=$BT/pgbr-gz.conf --stanza=bench archive-push %p"
fi
pg_start_archiving "$PGDATA" "$PORT" "$ARCHIVE_CMD"
for c in lz4 gz; do
    ((USE_PGBR)) || break
    as_pg pgbackrest --config="$BT/pgbr-$c.conf" --stanza=bench stanza-create >"$BT/log/stanza-$c.log" 2>&1
done

pgbench() { as_pg "$PGBIN/pgbench" -h "$BT/sock" -p "$PORT" -U postgres "$@" postgres >>"$BT/log/pgbench.log" 2>&1; }

# Switches to a new WAL segment and waits until the old one is in all three repositories.
switch_and_wait_archived() {
    local seg
    seg=$(psql_at "$PORT" "select pg_walfile_name(pg_switch_wal())")
    local deadline=$((SECONDS + 600))
    until [[ "$(psql_at "$PORT" "select coalesce(last_archived_wal, '') >= '$seg' from pg_stat_archiver")" == t ]]; do
        ((SECONDS < deadline)) || die "WAL $seg not archived after 600 s (see $BT/log/pg.log)"
        sleep 0.2
    done
}

db_bytes() { psql_at "$PORT" "select sum(pg_database_size(datname))::bigint from pg_database"; }

backup_cmd() { # method round -> command words
    case $1 in
    basebackup) echo "$PGBIN/pg_basebackup" -h "$BT/sock" -p "$PORT" -U postgres -D "$BT/bb/$2" -Ft -X none -c fast ;;
    pitr) echo "$PITR" --repo "$R/pitr" backup -d "$CONN" ;;
    pitr-base) echo "$PITR_BASE" --repo "$R/pitr-base" backup -d "$CONN" ;;
    pgbr-lz4) echo pgbackrest --config="$BT/pgbr-lz4.conf" --stanza=bench --type=full backup ;;
    pgbr-lz4-p2) echo pgbackrest --config="$BT/pgbr-lz4.conf" --stanza=bench --type=full --process-max=2 backup ;;
    pgbr-gz) echo pgbackrest --config="$BT/pgbr-gz.conf" --stanza=bench --type=full backup ;;
    *) die "unknown backup method $1" ;;
    esac
}

run_backup() { # label method round
    if [[ $2 == pitr ]]; then # the conninfo has spaces: no word splitting for this one
        measure "$1" "$3" "$PITR" --repo "$R/pitr" backup -d "$CONN"
    elif [[ $2 == pitr-base ]]; then
        measure "$1" "$3" "$PITR_BASE" --repo "$R/pitr-base" backup -d "$CONN"
    else
        # shellcheck disable=SC2046
        measure "$1" "$3" $(backup_cmd "$2" "$3")
    fi
}

# ---- 4. incremental backups, chain restore, delta restore (part "incr") --------------------
# REPS rounds on the SCALE database, each:
#   pitr full F0, pgBackRest (lz4) full P0; change 1 = UPDATE of a contiguous CHANGE_PCT % of
#   pgbench_accounts, checkpoint; then, order rotating each round: pitr --incremental (parent F0),
#   pgbackrest --type=incr, pitr full F1 (same data). Change 2 (another range), pitr
#   --incremental I2 (parent I1: chain F0 <- I1 <- I2), pitr full F2 (same data as I2),
#   pgbackrest --type=incr. Restores (no target, restore command only, PostgreSQL not
#   started), order rotating: I2 (3-member chain) and F2 into empty directories; --delta of F2
#   and of I2 into directories restored from F0 before the changes; pgBackRest: its last incr
#   into an empty directory and with --delta into a directory restored from P0.
# Stored bytes: pitr's `list --json` stored_bytes of the new backup; pgBackRest's growth of
# the repository's backup/ directory (archived WAL excluded on both sides).
pitr_newest() { # field -> value of the newest backup in `pitr list --json` (ids sort by time)
    as_pg "$PITR" --repo "$R/pitr" list --json |
        python3 -c 'import json,sys; b=max(json.load(sys.stdin)["backups"], key=lambda b: b["id"]); print(b[sys.argv[1]])' "$1"
}
pgbr_newest() { # -> label of pgBackRest's newest backup
    as_pg pgbackrest --config="$BT/pgbr-lz4.conf" --stanza=bench info --output=json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["backup"][-1]["label"])'
}
pgbr_bytes() { du -sb "$R/pgbr-lz4/backup" | cut -f1; }
incr_change() { # n: UPDATE the n-th contiguous CHANGE_PCT % range of pgbench_accounts, checkpoint
    local rows=$((SCALE * 100000 * CHANGE_PCT / 100))
    local lo=$((($1 * rows) % (SCALE * 100000) + 1))
    psql_at "$PORT" "update pgbench_accounts set abalance = abalance + 1 where aid >= $lo and aid < $((lo + rows))" >/dev/null
    psql_at "$PORT" "checkpoint" >/dev/null
}
incr_step() { # label round what -> run one measured backup or restore, record bytes
    local l=$1 r=$2 d b0
    case $3 in
    pitr-full)
        measure "$l" "$r" "$PITR" --repo "$R/pitr" backup -d "$CONN"
        echo "$l $r $(pitr_newest stored_bytes)" >>"$BT/incr-bytes.txt" ;;
    pitr-incr:*)
        measure "$l" "$r" "$PITR" --repo "$R/pitr" backup -d "$CONN" --incremental --parent "${3#pitr-incr:}"
        echo "$l $r $(pitr_newest stored_bytes)" >>"$BT/incr-bytes.txt" ;;
    pgbr-*)
        b0=$(pgbr_bytes)
        measure "$l" "$r" pgbackrest --config="$BT/pgbr-lz4.conf" --stanza=bench --type="${3#pgbr-}" backup
        echo "$l $r $(($(pgbr_bytes) - b0))" >>"$BT/incr-bytes.txt" ;;
    esac
}
incr_restore() { # label round dir(empty, or prepared for --delta) cmd...
    local l=$1 r=$2 d=$3; shift 3
    [[ -d $d ]] || { mkdir -m 0700 "$d" && chown postgres:postgres "$d"; }
    measure "$l" "$r" "$@"
    rm -rf "$d"
}
incr_round() { # round
    local r=$1 f0 i1 i2 f2 p0 p2 j order=()
    incr_step "incr-setup/pitr-full0" "$r" pitr-full; f0=$(pitr_newest id)
    if ((USE_PGBR)); then incr_step "incr-setup/pgbr-full0" "$r" pgbr-full; p0=$(pgbr_newest); fi
    incr_change $((2 * r - 2))
    local steps=("incr-backup/pitr-incr pitr-incr:$f0" "incr-backup/pitr-full pitr-full")
    ((USE_PGBR)) && steps+=("incr-backup/pgbr-incr pgbr-incr")
    for ((j = 0; j < ${#steps[@]}; j++)); do
        # shellcheck disable=SC2086
        set -- ${steps[$(((r - 1 + j) % ${#steps[@]}))]}
        log "  round $r: $1"
        incr_step "$1" "$r" "$2"
        [[ $1 == incr-backup/pitr-incr ]] && i1=$(pitr_newest id)
    done
    incr_change $((2 * r - 1))
    incr_step "incr-setup/pitr-incr2" "$r" "pitr-incr:$i1"; i2=$(pitr_newest id)
    incr_step "incr-setup/pitr-full2" "$r" pitr-full; f2=$(pitr_newest id)
    if ((USE_PGBR)); then incr_step "incr-setup/pgbr-incr2" "$r" pgbr-incr; p2=$(pgbr_newest); fi
    # directories restored before the changes, for the --delta restores (not measured)
    local D="$BT/restore/incr"
    for m in pitr-delta pitr-delta-chain; do
        mkdir -m 0700 "$D-$m" && chown postgres:postgres "$D-$m"
        measure incr-setup/prep "$r" "$PITR" --repo "$R/pitr" restore --pgdata "$D-$m" --backup "$f0"
    done
    if ((USE_PGBR)); then
        mkdir -m 0700 "$D-pgbr-delta" && chown postgres:postgres "$D-pgbr-delta"
        measure incr-setup/prep "$r" pgbackrest --config="$BT/pgbr-lz4.conf" --stanza=bench --pg1-path="$D-pgbr-delta" --set="$p0" restore
    fi
    local rs=("pitr-full" "pitr-chain" "pitr-delta" "pitr-delta-chain")
    ((USE_PGBR)) && rs+=("pgbr-chain" "pgbr-delta")
    for ((j = 0; j < ${#rs[@]}; j++)); do
        m=${rs[$(((r - 1 + j) % ${#rs[@]}))]}
        log "  round $r: restore $m"
        case $m in
        pitr-full) incr_restore "incr-restore/$m" "$r" "$D-$m" "$PITR" --repo "$R/pitr" restore --pgdata "$D-$m" --backup "$f2" ;;
        pitr-chain) incr_restore "incr-restore/$m" "$r" "$D-$m" "$PITR" --repo "$R/pitr" restore --pgdata "$D-$m" --backup "$i2" ;;
        pitr-delta) incr_restore "incr-restore/$m" "$r" "$D-$m" "$PITR" --repo "$R/pitr" restore --delta --pgdata "$D-$m" --backup "$f2" ;;
        pitr-delta-chain) incr_restore "incr-restore/$m" "$r" "$D-$m" "$PITR" --repo "$R/pitr" restore --delta --pgdata "$D-$m" --backup "$i2" ;;
        pgbr-chain) incr_restore "incr-restore/$m" "$r" "$D-$m" pgbackrest --config="$BT/pgbr-lz4.conf" --stanza=bench --pg1-path="$D-$m" --set="$p2" restore ;;
        pgbr-delta) incr_restore "incr-restore/$m" "$r" "$D-$m" pgbackrest --config="$BT/pgbr-lz4.conf" --stanza=bench --pg1-path="$D-$m" --set="$p2" --delta restore ;;
        esac
    done
}
incr_bytes_median() { # label -> median stored bytes
    local vals
    mapfile -t vals < <(awk -v l="$1" '$1 == l {print $3}' "$BT/incr-bytes.txt")
    median_of "${vals[@]}"
}
incr_part() {
    : >"$BT/incr-bytes.txt"
    log "incremental backups: ${CHANGE_PCT} % changes of pgbench_accounts, $REPS rounds"
    local l0 l1 r
    l0=$(cut -d' ' -f1-3 /proc/loadavg)
    for ((r = 1; r <= REPS; r++)); do incr_round "$r" >&2; done
    l1=$(cut -d' ' -f1-3 /proc/loadavg)
    echo
    echo "## Incremental backups and delta restore: pgbench scale $SCALE ($((BIG_BYTES / 1000000)) MB database), ${CHANGE_PCT} % of pgbench_accounts changed, $REPS rounds"
    echo
    sed 's/^/    /' "$BT/machine.txt"
    echo "    loadavg: $l0 -> $l1"
    report --prefix incr-backup/ --ref pitr-full --title "Backup after the change (x pitr-full = time ratio)"
    echo
    echo "| backup | stored bytes per round | median | x pitr-full |"
    echo "|---|---|---|---|"
    local full; full=$(incr_bytes_median incr-backup/pitr-full)
    for l in incr-backup/pitr-full incr-backup/pitr-incr incr-backup/pgbr-incr incr-setup/pgbr-full0 incr-setup/pitr-incr2; do
        grep -q "^$l " "$BT/incr-bytes.txt" || continue
        local b; b=$(incr_bytes_median "$l")
        echo "| ${l#*/} | $(awk -v l="$l" '$1 == l {printf "%s%d", s, $3; s = ", "}' "$BT/incr-bytes.txt") | $b | $(awk -v a="$b" -v f="$full" 'BEGIN {printf "%.3f", a / f}') |"
    done
    report --prefix incr-restore/ --ref pitr-full \
        --title "Restore (restore command only; x pitr-full = F2 into an empty directory)"
    echo
    echo "Peak RSS (ru_maxrss, MiB, every round; issue 12 goal: at most 64 MiB):"
    echo
    awk -F'"' '/"label": "incr-(backup|restore)\// {l = $4; match($0, /"maxrss_kb": [0-9]+/); k = substr($0, RSTART + 13, RLENGTH - 13); a[l] = a[l] sprintf("%s%.1f", (a[l] == "" ? "" : ", "), k / 1024)} END {for (l in a) print "    " l "  " a[l]}' "$BT/results.jsonl" | sort
    echo
    echo "Every run (wall ms, round: value):"
    echo
    awk -F'"' '/"label": "incr-(backup|restore)\// {l = $4; match($0, /"key": "[^"]*"/); k = substr($0, RSTART + 8, RLENGTH - 9); match($0, /"wall_ms": [0-9.]+/); w = substr($0, RSTART + 11, RLENGTH - 11); a[l] = a[l] sprintf("%s%s: %.0f", (a[l] == "" ? "" : ", "), k, w)} END {for (l in a) print "    " l "  " a[l]}' "$BT/results.jsonl" | sort
}

# ---- 5. restore rate against the disk's sequential write rate (part "rate") ---------------
# One pitr backup of the SCALE database (and one by BASE into its repository), then REPS rounds,
# the order rotating each round:
#   pitr / pitr-base  pitr restore --pgdata D --backup ID into an empty directory (the restore
#                     command only: PostgreSQL is not started); durable when it returns
#   dd                dd if=/dev/zero of=$BT/restore/dd bs=8M count=BYTES iflag=count_bytes
#                     conv=fsync: the same number of bytes, one file, fsynced once at the end
# BYTES = the sum of the restored files' sizes (what the restore writes); all targets are under
# $BT/restore, on the same filesystem. MB/s = BYTES / wall; "x dd" is the time ratio, so the
# restore's rate as a fraction of the disk's is its inverse. The repository is warm in the page
# cache (just written), as after a backup; the restore's final syncfs also flushes whatever else
# is dirty on that filesystem, which dd's fsync of one file does not.
rate_part() {
    local ids=() m r j d bytes="" methods=(pitr dd)
    [[ -n "$PITR_BASE" ]] && methods=(pitr pitr-base dd)
    measure rate-setup/backup 1 "$PITR" --repo "$R/pitr" backup -d "$CONN"
    ids[0]=$(as_pg "$PITR" --repo "$R/pitr" list --json | python3 -c 'import json,sys; print(max(b["id"] for b in json.load(sys.stdin)["backups"]))')
    if [[ -n "$PITR_BASE" ]]; then
        measure rate-setup/backup-base 1 "$PITR_BASE" --repo "$R/pitr-base" backup -d "$CONN"
        ids[1]=$(as_pg "$PITR_BASE" --repo "$R/pitr-base" list --json | python3 -c 'import json,sys; print(max(b["id"] for b in json.load(sys.stdin)["backups"]))')
    fi
    switch_and_wait_archived
    local l0 l1
    l0=$(cut -d' ' -f1-3 /proc/loadavg)
    for ((r = 1; r <= REPS; r++)); do
        for ((j = 0; j < ${#methods[@]}; j++)); do
            m=${methods[$(((r - 1 + j) % ${#methods[@]}))]}
            d="$BT/restore/rate-$m"
            log "  round $r: $m (load $(cut -d' ' -f1 /proc/loadavg))"
            round_warm "$bytes"
            case $m in
            pitr | pitr-base)
                mkdir -m 0700 "$d" && chown postgres:postgres "$d"
                if [[ $m == pitr ]]; then
                    measure "rate/$m" "$r" "$PITR" --repo "$R/pitr" restore --pgdata "$d" --backup "${ids[0]}"
                else
                    measure "rate/$m" "$r" "$PITR_BASE" --repo "$R/pitr-base" restore --pgdata "$d" --backup "${ids[1]}"
                fi
                [[ -n "$bytes" ]] || bytes=$(find "$d" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
                round_done "$d" "$m-$r" ;;
            dd)
                [[ -n "$bytes" ]] || die "dd needs the restored byte count: pitr runs first in round 1"
                measure "rate/dd" "$r" dd if=/dev/zero of="$BT/restore/dd" bs=8M count="$bytes" iflag=count_bytes conv=fsync
                round_done "$BT/restore/dd" "dd-$r" ;;
            esac
        done
    done
    round_kept_rm
    l1=$(cut -d' ' -f1-3 /proc/loadavg)
    echo
    echo "## Restore rate vs the disk: pgbench scale $SCALE ($((BIG_BYTES / 1000000)) MB database, restore writes $((bytes / 1000000)) MB), $REPS rounds"
    echo
    sed 's/^/    /' "$BT/machine.txt"
    echo "    loadavg: $l0 -> $l1; RESTORE_FS=$RESTORE_FS ROUND_RM=$ROUND_RM ROUND_WARM=$ROUND_WARM"
    report --prefix rate/ --ref dd --mb "$(awk -v b="$bytes" 'BEGIN {print b / 1e6}')" \
        --title "Restore vs dd conv=fsync of the same bytes (x dd = time ratio; rate / disk rate = 1 / x dd)"
    echo
    echo "Every run (wall ms / CPU ms / peak RSS MiB):"
    echo
    awk -F'"' '/"label": "rate\// {l = $4; match($0, /"key": "[^"]*"/); k = substr($0, RSTART + 8, RLENGTH - 9); match($0, /"wall_ms": [0-9.]+/); w = substr($0, RSTART + 11, RLENGTH - 11); match($0, /"cpu_ms": [0-9.]+/); c = substr($0, RSTART + 10, RLENGTH - 10); match($0, /"maxrss_kb": [0-9]+/); x = substr($0, RSTART + 13, RLENGTH - 13); a[l] = a[l] sprintf("%s%s: %.0f / %.0f / %.1f", (a[l] == "" ? "" : ", "), k, w, c, x / 1024)} END {for (l in a) print "    " l "  " a[l]}' "$BT/results.jsonl" | sort
}

# ---- 6. backup vs the server's send rate (part "send") ----------------------------------------
# Reference: pg_basebackup -h SOCK -p PORT -U postgres -D - -Ft -X none -c fast > /dev/null, the
# same cluster, interleaved with pitr backup (order rotating per round). Both send the same
# BASE_BACKUP options that cost the server work: MANIFEST 'yes' with CRC32C, TABLESPACE_MAP,
# WAIT, fast checkpoint, no MAX_RATE, checksums verified when the cluster has them (pitr also
# asks for PROGRESS, a size pre-scan; pg_basebackup only with -P). pitr also streams the
# backup's WAL over a second connection. "server CPU" = the postmaster's cutime + cstime delta
# over the call: the walsenders' CPU, counted when they exit (clock ticks, 10 ms).
server_cpu() { # -> reaped children's CPU seconds of the postmaster
    awk '{print ($16 + $17) / 100}' "/proc/$(head -1 "$PGDATA/postmaster.pid")/stat"
}
send_part() {
    local m r j c0 methods=() cpus="" via
    # Without archiving: with archive_mode = on, BASE_BACKUP's stop waits for the archiver,
    # checking once a second (PostgreSQL 15's do_pg_backup_stop), which puts ~1 s into both
    # sides and hides the send rate. pitr streams its backup's WAL itself. With SEND_VIA=tcp
    # the server also listens on 127.0.0.1 (trust, as initdb -A trust sets for host lines).
    pg_stop "$PGDATA"
    pg_start "$PGDATA" "-c archive_mode=off -c listen_addresses=127.0.0.1"
    for via in $SEND_VIA; do
        [[ $via == unix || $via == tcp ]] || die "SEND_VIA: unix, tcp or both ('unix tcp'), not $via"
        methods+=("basebackup-$via" "pitr-$via")
        [[ -n "$PITR_BASE" ]] && methods+=("pitr-base-$via")
    done
    local tar_bytes l0 l1
    tar_bytes=$(as_pg "$PGBIN/pg_basebackup" -h "$BT/sock" -p "$PORT" -U postgres -D - -Ft -X none -c fast | wc -c)
    l0=$(cut -d' ' -f1-3 /proc/loadavg)
    for ((r = 1; r <= REPS; r++)); do
        for ((j = 0; j < ${#methods[@]}; j++)); do
            m=${methods[$(((r - 1 + j) % ${#methods[@]}))]}
            log "  round $r: $m (load $(cut -d' ' -f1 /proc/loadavg))"
            # pitr's stored parts and the server's reads take page cache like a restore does.
            round_warm "$tar_bytes"
            c0=$(server_cpu)
            # The server's unix socket buffer is the sender's (212992 bytes here): a receiver
            # that is not always waiting in recv lets the walsender block. TCP on loopback
            # buffers megabytes (tcp_rmem, autotuned), as a backup from another host does.
            local host=$BT/sock
            [[ $m == *-tcp ]] && host=127.0.0.1
            local conn="host=$host port=$PORT user=postgres"
            case ${m%-*} in
            basebackup) measure "send/$m" "$r" sh -c "'$PGBIN/pg_basebackup' -h '$host' -p $PORT -U postgres -D - -Ft -X none -c fast > /dev/null" ;;
            pitr) measure "send/$m" "$r" "$PITR" --repo "$R/pitr" backup -d "$conn" --checkpoint fast ;;
            pitr-base) measure "send/$m" "$r" "$PITR_BASE" --repo "$R/pitr-base" backup -d "$conn" --checkpoint fast ;;
            esac
            sleep 0.3 # the walsenders have exited and been reaped
            cpus+="    send/$m $r $(awk -v a="$c0" -v b="$(server_cpu)" 'BEGIN {printf "%.2f", b - a}')"$'\n'
        done
    done
    l1=$(cut -d' ' -f1-3 /proc/loadavg)
    pg_stop "$PGDATA"
    pg_start "$PGDATA"
    echo
    echo "## Backup vs the server's send rate: pgbench scale $SCALE (base.tar $((tar_bytes / 1000000)) MB), $REPS rounds"
    echo
    sed 's/^/    /' "$BT/machine.txt"
    echo "    loadavg: $l0 -> $l1; ROUND_WARM=$ROUND_WARM"
    for via in $SEND_VIA; do
        report --prefix send/ --ref "basebackup-$via" --labels "$(printf '%s\n' "${methods[@]}" | grep -- "-$via\$" | paste -sd,)" \
            --mb "$(awk -v b="$tar_bytes" 'BEGIN {print b / 1e6}')" \
            --title "over $via: pitr backup vs pg_basebackup to /dev/null (x basebackup = time ratio; send-rate fraction = 1 / x)"
    done
    echo
    echo "Server (walsender) CPU s per call:"
    printf '%s' "$cpus" | sort
}

if [[ $PARTS != *" main "* ]]; then
    log "database: pgbench -i -s $SCALE"
    pgbench -i -s "$SCALE" -q
    psql_at "$PORT" "checkpoint" >/dev/null
    BIG_BYTES=$(db_bytes)
    : >"$BT/report.md"
    [[ $PARTS == *" rate "* ]] && rate_part | tee -a "$BT/report.md"
    [[ $PARTS == *" send "* ]] && send_part | tee -a "$BT/report.md"
    [[ $PARTS == *" incr "* ]] && incr_part | tee -a "$BT/report.md"
    if [[ -n "${BENCH_OUT:-}" ]]; then cp "$BT/report.md" "$BENCH_OUT"; cp "$BT/results.jsonl" "${BENCH_OUT%.md}.jsonl"; fi
    exit 0
fi

# ---- 1. peak RSS at the small scale -------------------------------------------------------
log "small database: pgbench -i -s $SMALL_SCALE"
pgbench -i -s "$SMALL_SCALE" -q
SMALL_BYTES=$(db_bytes)
run_backup "rss-small/pitr-backup" pitr 1
switch_and_wait_archived
mkdir -p "$BT/restore/small" && chown postgres:postgres "$BT/restore/small"
measure "rss-small/pitr-restore" 1 "$PITR" --repo "$R/pitr" restore --pgdata "$BT/restore/small"
rm -rf "$BT/restore/small"

# ---- 2. backups at SCALE ------------------------------------------------------------------
log "database: pgbench -i -s $SCALE"
pgbench -i -s "$SCALE" -q
psql_at "$PORT" "checkpoint" >/dev/null
switch_and_wait_archived
BIG_BYTES=$(db_bytes)
log "database size $((BIG_BYTES / 1000000)) MB; backups: ${BACKUP_METHODS[*]} x $REPS rounds"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
TAR_BYTES=""
NB=${#BACKUP_METHODS[@]}
for ((r = 1; r <= REPS; r++)); do
    for ((j = 0; j < NB; j++)); do
        m=${BACKUP_METHODS[$(((r - 1 + j) % NB))]}
        log "  round $r: $m"
        run_backup "backup/$m" "$m" "$r"
        if [[ $m == basebackup ]]; then
            TAR_BYTES=$(stat -c %s "$BT/bb/$r/base.tar")
            rm -rf "$BT/bb/$r"
        fi
    done
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)
[[ -n "$TAR_BYTES" ]] || TAR_BYTES=$BIG_BYTES

# ---- 3. PITR end to end -------------------------------------------------------------------
log "writing ~$REPLAY_MB MB of WAL to replay (pgbench TPC-B bursts + batched UPDATEs of pgbench_accounts)"
# TPC-B alone writes only ~2 MB/s of WAL here once the pages carry no more full-page images;
# batches of 200k-row UPDATEs (non-HOT, index entries, full-page images of untouched pages)
# between short pgbench bursts reach the target in well under a minute.
lsn0=$(psql_at "$PORT" "select pg_current_wal_lsn()")
deadline=$((SECONDS + 240))
aid=1
while (($(psql_at "$PORT" "select (pg_current_wal_lsn() - '$lsn0')::bigint / 1000000") < REPLAY_MB)); do
    ((SECONDS < deadline)) || { log "  stopped WAL generation at the 240 s cap"; break; }
    pgbench -n -c 2 -j 2 -T 2
    psql_at "$PORT" "update pgbench_accounts set abalance = abalance + 1 where aid >= $aid and aid < $((aid + 200000))" >/dev/null
    aid=$(((aid + 200000) % (SCALE * 100000)))
done
REPLAY_BYTES=$(psql_at "$PORT" "select (pg_current_wal_lsn() - '$lsn0')::bigint")
sleep 1.2
TARGET=$(psql_at "$PORT" "select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00'")
sleep 1.2
pgbench -n -c 1 -T 2
switch_and_wait_archived
EXPECT_ROWS=$(psql_at "$PORT" "select count(*) from pgbench_history where mtime <= '$TARGET'")
log "target time $TARGET ($((REPLAY_BYTES / 1000000)) MB of WAL since the backups); $EXPECT_ROWS history rows at T"
pg_stop "$PGDATA"

# The measured unit: restore, then start PostgreSQL and wait until it accepts connections out
# of recovery (polled every 50 ms). Runs as postgres. Writes per-phase times and the restore command's peak RSS.
cat >"$BT/bin/e2e.sh" <<'SH'
#!/bin/bash
set -euo pipefail
label=$1 key=$2 newdir=$3 port=$4 sock=$5 pgbin=$6 phases=$7; shift 7
t0=$(date +%s%N)
/usr/bin/time -f '%M' -o "$newdir.rss" "$@" >"$newdir.restore.log" 2>&1
t1=$(date +%s%N)
"$pgbin/pg_ctl" -D "$newdir" -l "$newdir.pg.log" -t 3600 -w \
    -o "-p $port -c archive_mode=off -c hot_standby=off" start >/dev/null
# pg_ctl -w returns once the server is "ready" or "standby" (consistent, still replaying), so
# poll until a connection is accepted out of recovery: that is the end of PITR.
until [[ "$("$pgbin/psql" -X -At -h "$sock" -p "$port" -U postgres -d postgres -c 'select pg_is_in_recovery()' 2>/dev/null)" == f ]]; do
    [[ -f "$newdir/postmaster.pid" ]] || { echo "PostgreSQL on $newdir stopped" >&2; exit 1; }
    sleep 0.05
done
t2=$(date +%s%N)
echo "$label $key $(((t1 - t0) / 1000000)) $(((t2 - t1) / 1000000)) $(cat "$newdir.rss")" >>"$phases"
SH
chmod 0755 "$BT/bin/e2e.sh"
: >"$BT/phases.txt"
chown postgres:postgres "$BT/phases.txt"

log "PITR end to end: ${RESTORE_METHODS[*]} x $REPS rounds"
NR=${#RESTORE_METHODS[@]}
for ((r = 1; r <= REPS; r++)); do
    for ((j = 0; j < NR; j++)); do
        m=${RESTORE_METHODS[$(((r - 1 + j) % NR))]}
        d="$BT/restore/$m-$r"
        mkdir -m 0700 "$d" && chown postgres:postgres "$d"
        log "  round $r: $m"
        round_warm "$BIG_BYTES"
        # TARGET has a space: the restore command is an array, never word-split.
        case $m in
        pitr) cmd=("$PITR" --repo "$R/pitr" restore --pgdata "$d" --target-time "$TARGET") ;;
        pitr-base) cmd=("$PITR_BASE" --repo "$R/pitr-base" restore --pgdata "$d" --target-time "$TARGET") ;;
        pgbr-lz4-p2) cmd=(pgbackrest --config="$BT/pgbr-lz4.conf" --stanza=bench --pg1-path="$d" --process-max=2 --type=time "--target=$TARGET" --target-action=promote restore) ;;
        pgbr-*) cmd=(pgbackrest --config="$BT/pgbr-${m#pgbr-}.conf" --stanza=bench --pg1-path="$d" --type=time "--target=$TARGET" --target-action=promote restore) ;;
        esac
        measure "pitr-e2e/$m" "$r" "$BT/bin/e2e.sh" "$m" "$r" "$d" "$PORT" "$BT/sock" "$PGBIN" "$BT/phases.txt" "${cmd[@]}"
        rows=$(psql_at "$PORT" "select count(*) from pgbench_history")
        [[ "$rows" == "$EXPECT_ROWS" ]] || die "$m round $r restored $rows history rows, expected $EXPECT_ROWS"
        if ((r == 1)); then grep -E '^(restore_command|recovery_target)' "$d/postgresql.auto.conf" >"$BT/log/auto-conf-$m.txt" || true; fi
        pg_stop "$d"
        for f in "$d".*.log; do mv "$f" "$BT/log/$(basename "$f")"; done
        rm -rf "$d".*
        round_done "$d" "e2e-$m-$r"
    done
done
round_kept_rm
load2=$(cut -d' ' -f1-3 /proc/loadavg)

phase_median() { # method column(3=restore ms, 4=replay ms, 5=rss kB)
    local vals
    mapfile -t vals < <(awk -v m="$1" -v c="$2" '$1 == m {print $c}' "$BT/phases.txt")
    median_of "${vals[@]}"
}

# PostgreSQL fsyncs the whole data directory at startup after a crash or a restored backup
# (SyncDataDirectory, between "database system was interrupted" and "starting point-in-time
# recovery"): cheap when the restore tool synced its files, the full writeback when it did not.
startup_sync_median() { # method
    local vals=() f
    for f in "$BT"/log/"$1"-*.pg.log; do
        vals+=("$(awk '/database system was interrupted/ {split($2, a, ":"); t0 = a[1] * 3600 + a[2] * 60 + a[3]}
                       /starting point-in-time recovery/ {split($2, a, ":"); print int((a[1] * 3600 + a[2] * 60 + a[3] - t0) * 1000); exit}' "$f")")
    done
    median_of "${vals[@]}"
}

{
    echo
    echo "## backup_restore.sh results: pgbench scale $SCALE ($((BIG_BYTES / 1000000)) MB database, base.tar $((TAR_BYTES / 1000000)) MB), $REPS rounds"
    echo
    sed 's/^/    /' "$BT/machine.txt"
    echo "    loadavg: backups $load0 -> $load1, restores -> $load2"
    report --prefix backup/ --ref "$BACKUP_REF" --mb "$(awk -v b="$TAR_BYTES" 'BEGIN {print b / 1e6}')" \
        --labels "$(IFS=,; echo "${BACKUP_METHODS[*]}")" \
        --title "Base backup (x $BACKUP_REF = time ratio; throughput ratio is its inverse)"
    echo
    echo "### Repository size after the backups (all rounds; includes archived WAL)"
    echo
    for d in pitr pitr-base pgbr-lz4 pgbr-gz; do
        if [[ -d "$R/$d" ]]; then echo "    $d: $(du -sh "$R/$d" | cut -f1)"; fi
    done
    ref=${RESTORE_METHODS[1]:-${RESTORE_METHODS[0]}}
    report --prefix pitr-e2e/ --ref "$ref" \
        --title "PITR end to end: restore to T + replay $((REPLAY_BYTES / 1000000)) MB of WAL until connections are accepted (x $ref)"
    echo
    echo "| method | restore ms (median) | start+replay ms (median) | of which startup fsync ms (median) | restore command peak RSS MiB (median) |"
    echo "|---|---|---|---|---|"
    for m in "${RESTORE_METHODS[@]}"; do
        echo "| $m | $(phase_median "$m" 3) | $(phase_median "$m" 4) | $(startup_sync_median "$m") | $(awk -v k="$(phase_median "$m" 5)" 'BEGIN {printf "%.1f", k / 1024}') |"
    done
    echo
    echo "### pitr peak RSS by database size"
    echo
    echo "| command | scale $SMALL_SCALE ($((SMALL_BYTES / 1000000)) MB) | scale $SCALE ($((BIG_BYTES / 1000000)) MB) |"
    echo "|---|---|---|"
    rss() { awk -v l="$1" -F'"maxrss_kb": ' 'index($0, "\"label\": \"" l "\"") {split($2, a, ","); if (a[1] > m) m = a[1]} END {printf "%.1f MiB", m / 1024}' "$BT/results.jsonl"; }
    echo "| pitr backup | $(rss rss-small/pitr-backup) | $(rss backup/pitr) |"
    big_restore_rss=$(awk '$1 == "pitr" {if ($5 > m) m = $5} END {printf "%.1f MiB", m / 1024}' "$BT/phases.txt")
    echo "| pitr restore | $(rss rss-small/pitr-restore) | $big_restore_rss |"
    echo
    echo "restore_command written by each tool:"
    for f in "$BT"/log/auto-conf-*.txt; do sed 's/^/    /' "$f"; done
} | tee "$BT/report.md"
if [[ -n "${BENCH_OUT:-}" ]]; then cp "$BT/report.md" "$BENCH_OUT"; cp "$BT/results.jsonl" "${BENCH_OUT%.md}.jsonl"; cp "$BT/phases.txt" "${BENCH_OUT%.md}.phases"; fi
if [[ $PARTS == *" incr "* ]]; then
    pg_start "$PGDATA"
    incr_part | tee -a "$BT/report.md"
    if [[ -n "${BENCH_OUT:-}" ]]; then cp "$BT/report.md" "$BENCH_OUT"; cp "$BT/results.jsonl" "${BENCH_OUT%.md}.jsonl"; fi
fi

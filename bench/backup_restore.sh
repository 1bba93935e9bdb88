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

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCALE=${SCALE:-50}
SMALL_SCALE=${SMALL_SCALE:-10}
REPS=${REPS:-3}
REPLAY_MB=${REPLAY_MB:-384}
BACKUP_METHODS=(${BACKUP_METHODS:-basebackup pitr pgbr-lz4 pgbr-lz4-p2 pgbr-gz})
RESTORE_METHODS=(${RESTORE_METHODS:-pitr pgbr-lz4 pgbr-gz})
BACKUP_REF=${BACKUP_REF:-basebackup}
for m in "${BACKUP_METHODS[@]}" "${RESTORE_METHODS[@]}"; do
    [[ $m != pitr-base || -n "${BASE:-}" ]] || die "method pitr-base needs BASE=/path/to/pitr"
done
USE_PGBR=0
wants_pgbr "${BACKUP_METHODS[@]}" "${RESTORE_METHODS[@]}" && USE_PGBR=1
NEED_PGBR=$USE_PGBR

bench_init backup
machine_info | tee "$BT/machine.txt" >&2

PORT=$(free_port)
PGDATA="$BT/pg"
R="$BT/repos"
mkdir -p "$R/pitr" "$BT/bb" "$BT/restore"
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
pg_init "$PGDATA" "$PORT" \
    "wal_level = replica" \
    "archive_mode = on" \
    "archive_command = '$ARCHIVE_CMD'" \
    "max_wal_size = 2GB" \
    "checkpoint_timeout = 30min" \
    "shared_buffers = 128MB" \
    "max_wal_senders = 10"
chown -R postgres:postgres "$BT"
pg_start "$PGDATA"
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
        rm -rf "$d" "$d".*
    done
done
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

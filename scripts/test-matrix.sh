#!/usr/bin/env bash
# The PostgreSQL version matrix: runs the core integration tests against each extra major
# from scripts/install-pg-matrix.sh (13, 14, 16, 17, 18), with PG_BIN pointing the test
# harness at that major's binaries. The full suite runs against Debian's PostgreSQL 15
# (scripts/test.sh); this catches what differs by major: the pre-15 BASE_BACKUP grammar and
# one-CopyOut-per-tablespace format, READ_REPLICATION_SLOT (15+), manifest version 2 (17+),
# the WAL page magic and record layouts, 13's md5 password default.
#
# The core tests, each on every major (docs/compatibility.md):
#   archive       archive::archive_and_recover_on_{local_directory,s3}
#   backup and restore to every target kind (time, lsn, name, xid, latest)
#                 pitr::pitr_to_every_target_kind_on_{local_directory,s3}
#   backup from a standby, backup with its own WAL   standby_backup::*
#   stream        stream::stream_matches_pg_wal_under_load_on_{local_directory,s3}
#   failover      failover::* (the stream through a promotion: behind, ahead, WAL gone)
#   timeline switch   pitr::restore_follows_a_timeline_switch (restore),
#                 stream::promote_follows_to_timeline_2 (stream), pg_client::timeline_switch_*
#   verify        verify::verify_finds_flipped_byte_*_on_{local_directory,s3},
#                 verify::only_full_verify_* (record decoding; local),
#                 verify::summaries_bound_time_targets_* (commit records)
#   protocol      pg_client::* (replication client, BASE_BACKUP, TLS, auth)
# Left to the PG 15 run: cases that repeat these per backend with nothing version-specific
# (crash_and_restore_latest, target_name_restores_*, only_full_verify on S3).
#
#   scripts/test-matrix.sh [MAJOR...]     default: every major the install script provides
#
#   PG_MATRIX_FILTER   nextest filterset to run instead of the default one below
#   PG_MATRIX_JOBS     majors run at once (default 3), each its own nextest run
#   PG_MATRIX_THREADS  test processes per major (default 2); JOBS x THREADS tests at once:
#                      they mostly wait on PostgreSQL, but a walsender with a 2 s
#                      wal_sender_timeout (pg_client) must still get its replies in time
#   PG_MATRIX_DIR, PG_MATRIX_VERSIONS     see scripts/install-pg-matrix.sh
#
# Every major is run even when another fails; the exit status is non-zero if any failed.
# Each major's output is printed whole when it ends. Needs cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

DEFAULT_FILTER='test(/^(harness::selftest::pg_cluster_create_insert_read_back|pg_client::.*|archive::archive_and_recover_on_.*|pitr::pitr_to_every_target_kind_on_.*|pitr::restore_follows_a_timeline_switch|standby_backup::.*|stream::stream_matches_pg_wal_under_load_on_.*|stream::promote_follows_to_timeline_2|failover::.*|incremental::.*|incremental_restore::.*|verify::verify_finds_flipped_byte_deleted_segment_and_truncated_history_on_.*|verify::only_full_verify_catches_a_broken_record_behind_a_valid_frame_on_local_directory|verify::summaries_bound_time_targets_by_the_last_archived_commit)$/)'
FILTER=${PG_MATRIX_FILTER:-$DEFAULT_FILTER}
JOBS=${PG_MATRIX_JOBS:-3}
THREADS=${PG_MATRIX_THREADS:-2}

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "test-matrix: cargo-nextest is needed (cargo install cargo-nextest --locked)" >&2
    exit 1
fi

declare -A BIN=()
majors=()
while read -r major dir; do
    BIN[$major]=$dir
    majors+=("$major")
done < <(bash scripts/install-pg-matrix.sh)
if [ $# -gt 0 ]; then
    majors=("$@")
fi

# Build once, before the majors start: their runs then only check that it is fresh.
cargo nextest run --no-run --locked --test integration

LOGS=$(mktemp -d "${TMPDIR:-/tmp}/pitr-matrix.XXXXXX")
trap 'rm -rf "$LOGS"' EXIT

# One major: its own nextest run, output to $LOGS/<major>.log, the result line to
# $LOGS/<major>.result.
run_major() {
    local major=$1 dir=$2 t0=$SECONDS rc=0
    {
        echo "=== PostgreSQL $major: $("$dir/postgres" --version)  (PG_BIN=$dir)"
        # PATH too: `pitr drill` looks for the repository's major in /usr/lib/postgresql/<major>,
        # then on PATH.
        PATH="$dir:$PATH" PG_BIN=$dir cargo nextest run --locked --no-fail-fast \
            --test integration --test-threads "$THREADS" -E "$FILTER" || rc=$?
    } >"$LOGS/$major.log" 2>&1
    echo "PG $major: $([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)") in $((SECONDS - t0))s" \
        >"$LOGS/$major.result"
    return $rc
}

t_all=$SECONDS
declare -A PID=()
pending=()
for major in "${majors[@]}"; do
    if [ -z "${BIN[$major]:-}" ]; then
        echo "PG $major: not installed (have: ${!BIN[*]})" >"$LOGS/$major.result"
        continue
    fi
    pending+=("$major")
done
running=()
# A small job pool: start majors while fewer than $JOBS run; print each as it ends.
while [ ${#pending[@]} -gt 0 ] || [ ${#running[@]} -gt 0 ]; do
    while [ ${#pending[@]} -gt 0 ] && [ ${#running[@]} -lt "$JOBS" ]; do
        major=${pending[0]}
        pending=("${pending[@]:1}")
        run_major "$major" "${BIN[$major]}" &
        PID[$major]=$!
        running+=("$major")
    done
    wait -n || true
    still=()
    for major in "${running[@]}"; do
        if kill -0 "${PID[$major]}" 2>/dev/null; then
            still+=("$major")
        else
            wait "${PID[$major]}" || true
            echo
            cat "$LOGS/$major.log"
        fi
    done
    running=("${still[@]+"${still[@]}"}")
done

echo
echo "=== matrix results (${#majors[@]} majors, $JOBS at once, $THREADS tests each, $((SECONDS - t_all))s)"
rc=0
for major in "${majors[@]}"; do
    r=$(cat "$LOGS/$major.result")
    echo "  $r"
    case "$r" in *": ok in"*) ;; *) rc=1 ;; esac
done
exit $rc

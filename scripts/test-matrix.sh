#!/usr/bin/env bash
# The PostgreSQL version matrix: runs the core integration tests (replication protocol
# client, base backup, streaming, archiving, PITR, WAL parsing) against each extra major
# from scripts/install-pg-matrix.sh, with PG_BIN pointing the test harness at that major's
# binaries. The full suite runs against Debian's PostgreSQL 15 (scripts/test.sh); this
# catches what differs by major: the pre-15 BASE_BACKUP grammar and one-CopyOut-per-
# tablespace format, READ_REPLICATION_SLOT (15+), manifest version 2 (17+), WAL records.
#
#   scripts/test-matrix.sh [MAJOR...]     default: every major the install script provides
#
#   PG_MATRIX_FILTER   nextest filterset to run instead of the default subset below
#   PG_MATRIX_DIR, PG_MATRIX_VERSIONS     see scripts/install-pg-matrix.sh
#
# Every major is run even when an earlier one fails; the exit status is non-zero if any
# failed. Needs cargo-nextest (the filterset is nextest's).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

DEFAULT_FILTER='test(/^(archive::archive_and_recover_on_local_directory|pitr::pitr_to_every_target_kind_on_local_directory|pitr::restore_follows_a_timeline_switch|stream::stream_matches_pg_wal_under_load_on_local_directory|stream::promote_follows_to_timeline_2|verify::summaries_bound_time_targets_by_the_last_archived_commit|harness::selftest::pg_cluster_create_insert_read_back|pg_client::.*)$/)'
FILTER=${PG_MATRIX_FILTER:-$DEFAULT_FILTER}

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

# Build once, outside the per-major timings.
cargo nextest run --no-run --locked

declare -a results=()
rc=0
for major in "${majors[@]}"; do
    dir=${BIN[$major]:-}
    if [ -z "$dir" ]; then
        echo "test-matrix: no PostgreSQL $major (have: ${!BIN[*]})" >&2
        rc=1
        results+=("PG $major: not installed")
        continue
    fi
    echo
    echo "=== PostgreSQL $major: $("$dir/postgres" --version)  (PG_BIN=$dir)"
    t0=$SECONDS
    major_rc=0
    PG_BIN=$dir cargo nextest run --locked --no-fail-fast -E "$FILTER" || major_rc=$?
    results+=("PG $major: $([ $major_rc -eq 0 ] && echo ok || echo "FAILED ($major_rc)") in $((SECONDS - t0))s")
    [ $major_rc -eq 0 ] || rc=1
done

echo
echo "=== matrix results"
for r in "${results[@]}"; do echo "  $r"; done
exit $rc

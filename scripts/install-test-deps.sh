#!/usr/bin/env bash
# Installs what the integration tests need, when missing: PostgreSQL server binaries
# (Debian's postgresql-15), the S3-compatible test server s3s-fs, and promtool (Debian's
# prometheus package) for the alert rules in deploy/prometheus. Idempotent and quick
# when everything is there. Called by scripts/test.sh and .ci/run.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
PG_MAJOR=${PG_MAJOR:-15}
# 0.14.1 is the newest s3s-fs that builds with this machine's Rust (1.95).
S3S_FS_VERSION=${S3S_FS_VERSION:-0.14.1}

install_postgres() {
    if [ -x "/usr/lib/postgresql/${PG_MAJOR}/bin/initdb" ] && [ -x "/usr/lib/postgresql/${PG_MAJOR}/bin/psql" ]; then
        echo "PostgreSQL ${PG_MAJOR} already installed"
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "PostgreSQL ${PG_MAJOR} server binaries are missing: run (as root) apt-get install postgresql-${PG_MAJOR}" >&2
        return 1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "postgresql-${PG_MAJOR}" "postgresql-client-${PG_MAJOR}"
    # The package creates and may start a default cluster on 5432: the tests use their
    # own clusters only, so drop it rather than leave a stray server running.
    if command -v pg_dropcluster >/dev/null && [ -d "/etc/postgresql/${PG_MAJOR}/main" ]; then
        pg_dropcluster --stop "${PG_MAJOR}" main || true
    fi
}

install_s3s_fs() {
    if s3s-fs --version 2>/dev/null | grep -qF "$S3S_FS_VERSION"; then
        echo "s3s-fs $S3S_FS_VERSION already installed"
        return
    fi
    cargo install s3s-fs --version "$S3S_FS_VERSION" --features binary --locked
}

# promtool checks and unit-tests deploy/prometheus/pitr-alerts.yml (tests/ops.rs). The package
# also ships a Prometheus server; it must not keep running here.
install_promtool() {
    if command -v promtool >/dev/null; then
        echo "promtool already installed"
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "promtool is missing: run (as root) apt-get install prometheus" >&2
        return 1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus
    if command -v systemctl >/dev/null; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    if ! command -v promtool >/dev/null; then
        echo "installing prometheus did not provide promtool" >&2
        return 1
    fi
}

install_postgres
install_s3s_fs
install_promtool

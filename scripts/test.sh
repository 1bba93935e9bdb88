#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need when missing, then runs
# every test: unit tests, and integration tests against real PostgreSQL clusters and a real
# S3-compatible server on 127.0.0.1. Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
# nextest runs each test in its own process with the timeouts in .config/nextest.toml.
if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --no-fail-fast "$@"
else
    exec cargo test --no-fail-fast "$@"
fi

#!/usr/bin/env bash
# Installs what the tests need (on a fresh Debian machine too), then runs the format check,
# clippy with -D warnings, and the whole test suite against real PostgreSQL clusters and a real
# S3 API server (moto) on loopback. `.ci/run` calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_postgres
ensure_moto
ensure_azurite
ensure_test_tools
ensure_rust_tools
ensure_locales
ensure_prometheus
ensure_systemd_analyze

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
# Integration tests start their own clusters; two at a time suits a 2-core machine.
cargo test --locked -- --test-threads="${INVSYNC_TEST_THREADS:-2}"

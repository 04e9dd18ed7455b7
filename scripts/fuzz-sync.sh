#!/usr/bin/env bash
# Fuzzes the pgoutput decoder (fuzz/fuzz_targets/pgoutput.rs) for FUZZ_SECONDS (default 60).
# Needs a nightly toolchain; installs cargo-fuzz from crates.io if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo fuzz --help >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
cd fuzz
cargo +nightly fuzz run pgoutput -- -max_total_time="${FUZZ_SECONDS:-60}" -max_len=4096

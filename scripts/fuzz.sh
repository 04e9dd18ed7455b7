#!/usr/bin/env bash
# Fuzzes the parsers of untrusted bytes: the pgoutput decoder (`pgoutput`) and every repository
# object parser (`repo_*`), each for FUZZ_SECONDS (default 60), with cargo-fuzz and libFuzzer.
#
#   scripts/fuzz.sh                  every target in fuzz/fuzz_targets/
#   scripts/fuzz.sh pgoutput         only the named targets
#   FUZZ_SECONDS=600 scripts/fuzz.sh longer runs
#
# Runs on the stable toolchain: `--sanitizer none` keeps libFuzzer's coverage instrumentation
# without the nightly-only address sanitizer (the code under test is safe Rust; what is sought
# is a panic, an abort or runaway memory). Installs cargo-fuzz from crates.io if it is missing.
# Corpora grow under fuzz/corpus/<target>/, and a crashing input is saved under
# fuzz/artifacts/<target>/ and makes this script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo fuzz --help >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
seconds="${FUZZ_SECONDS:-60}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
  echo "== fuzzing $t for ${seconds}s"
  if ! cargo fuzz run --sanitizer none -O "$t" -- -max_total_time="$seconds" -max_len=65536 \
      -rss_limit_mb=1024 >"$log" 2>&1; then
    grep -E 'panicked|ERROR|SUMMARY|artifact' "$log" >&2 || tail -20 "$log" >&2
    echo "fuzz target $t failed: the input is saved under fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^Done' "$log"
done

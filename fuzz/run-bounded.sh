#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 20) from its seed corpus with a fixed libFuzzer
# seed; exits non-zero on the first crash, leak, timeout or out-of-memory.
#
# FUZZ_SANITIZER (default `address`) is passed to `cargo fuzz -s`. AddressSanitizer needs nightly
# compiler flags (RUSTC_BOOTSTRAP=1 lets a stable toolchain use them) and doubles the build time;
# the test suite runs with `none`, which still catches every panic, overflow (debug assertions
# are on), runaway allocation and hang in the parsers, which contain no unsafe code.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
sanitizer=${FUZZ_SANITIZER:-address}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
if [ "$sanitizer" != none ]; then
  export RUSTC_BOOTSTRAP=1
fi
cargo fuzz build -O -s "$sanitizer"
for target in lox24 tencent sendios phone; do
  echo "== fuzzing $target for ${seconds}s"
  work=$(mktemp -d)
  mkdir "$work/corpus"
  cp fuzz/seeds/"$target"/* "$work/corpus"/
  set +e
  cargo fuzz run -O -s "$sanitizer" "$target" "$work/corpus" -- \
    -seed=1 -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=1024 -timeout=10 \
    -print_final_stats=1 > "$work/log" 2>&1
  status=$?
  set -e
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)' "$work/log" || true
  if [ "$status" != 0 ]; then
    tail -60 "$work/log"
    exit 1
  fi
  rm -rf "$work"
done

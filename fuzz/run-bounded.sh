#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 20) from its seed corpus; exits non-zero on
# the first crash, leak or out-of-memory. Installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in lox24 tencent sendios phone; do
  echo "== fuzzing $target for ${seconds}s"
  work=$(mktemp -d)
  mkdir "$work/corpus"
  cp fuzz/seeds/"$target"/* "$work/corpus"/
  set +e
  cargo fuzz run -O "$target" "$work/corpus" -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=1024 -print_final_stats=1 \
    > "$work/log" 2>&1
  status=$?
  set -e
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)' "$work/log" || true
  if [ "$status" != 0 ]; then
    tail -60 "$work/log"
    exit 1
  fi
  rm -rf "$work"
done

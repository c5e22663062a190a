#!/usr/bin/env bash
# Store benchmark, side by side with an earlier build (BEFORE, a commit; default 682284f, the
# build before the log), each phase run for both builds in turn (A B A B…):
#   1. durable LOX24 deliveries over HTTPS keep-alive, 64 connections, DURATION seconds (20);
#      ROUNDS rounds (3), interleaved;
#   2. importing NUMBERS phone numbers (10,000,000) with `suppressd import`, then a clean stop
#      and a clean start: the time from start to "ready" (the clean-start open);
#   3. this build only: the database directory deleted, then the time from start to "ready",
#      which is the rebuild from the snapshots and the log.
# Prints a table per phase. The earlier build is compiled once into target/bench-before/.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${BEFORE:-682284f}
NUMBERS=${NUMBERS:-10000000}
DURATION=${DURATION:-20}
ROUNDS=${ROUNDS:-3}

command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
source benches/serve.sh
bench_setup
before_bin=$PWD/target/bench-before/release/suppressd
if [ ! -x "$before_bin" ] || [ "$(cat target/bench-before/commit 2>/dev/null)" != "$BEFORE" ]; then
  rm -rf target/bench-before/src
  git worktree add -f --detach target/bench-before/src "$BEFORE" >/dev/null 2>&1 ||
    git -C target/bench-before/src checkout -q --detach "$BEFORE"
  (cd target/bench-before/src && cargo build --release --locked -q --target-dir ../)
  echo "$BEFORE" > target/bench-before/commit
fi
now_bin=$PWD/target/release/suppressd
trap 'kill -9 "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

# start BIN DATA_DIR [FLAGS…]: starts one service and sets $pid, $webhook, $api, $ready_s.
start() {
  local bin=$1 data=$2
  shift 2
  : > "$work/log"
  local t0
  t0=$(date +%s.%N)
  "$bin" serve --data-dir "$data" --webhook-listen 127.0.0.1:0 --api-listen 127.0.0.1:0 \
    --lox24-secret-file "$work/lox24.secret" "$@" 2> "$work/log" &
  pid=$!
  for _ in $(seq 60000); do grep -q "suppressd ready" "$work/log" && break; sleep 0.01; done
  ready_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  webhook=$(grep -o 'webhook=[0-9.:]*' "$work/log" | cut -d= -f2)
  api=$(grep -o 'api=[0-9.:]*' "$work/log" | cut -d= -f2)
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== before: $BEFORE; this build: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')"

echo "== 1. durable LOX24 deliveries, HTTPS keep-alive, 64 connections, ${DURATION}s, $ROUNDS rounds"
printf '%-6s %-8s %12s %10s\n' round build "requests/s" "p99"
for round in $(seq "$ROUNDS"); do
  for build in before now; do
    bin=$before_bin; [ "$build" = now ] && bin=$now_bin
    rm -rf "$work/deliveries-data"
    start "$bin" "$work/deliveries-data"
    wrk -t2 -c64 -d"${DURATION}s" --latency -s benches/lox24.lua "https://$webhook/webhooks/lox24" > "$work/wrk" 2>&1
    stop
    printf '%-6s %-8s %12s %10s\n' "$round" "$build" "$(awk '/Requests\/sec/ {print $2}' "$work/wrk")" \
      "$(awk '$1 == "99%" {print $2}' "$work/wrk")"
  done
done

echo "== 2. import $NUMBERS numbers, then a clean stop and start"
awk -v n="$NUMBERS" 'BEGIN { for (i = 1; i <= n; i++) printf "+491%010d\n", 300000000 + i }' > "$work/numbers.txt"
printf '%-8s %10s %16s %14s\n' build "import s" "clean start s" "disk MiB"
for build in before now; do
  bin=$before_bin; [ "$build" = now ] && bin=$now_bin
  rm -rf "$work/$build"
  start "$bin" "$work/$build"
  TIMEFORMAT=%R
  import_s=$( { time "$now_bin" --api "http://$api" import "$work/numbers.txt" >/dev/null; } 2>&1 | tail -1 )
  stop
  start "$bin" "$work/$build"
  clean_s=$ready_s
  stop
  printf '%-8s %10s %16s %14s\n' "$build" "$import_s" "$clean_s" "$(du -sm "$work/$build" | cut -f1)"
  [ "$build" = before ] && rm -rf "$work/before"
done
rm -f "$work/numbers.txt"
echo "this build's data directory: $(du -sm "$work/now/log" | cut -f1) MiB log, $(du -sm "$work/now/snapshots" 2>/dev/null | cut -f1) MiB snapshots, $(du -sm "$work/now/db" | cut -f1) MiB sled"

echo "== 3. this build: database deleted, rebuilt from snapshot + log"
rm -rf "$work/now/db"
start "$now_bin" "$work/now"
grep -E "rebuilt|snapshot is in" "$work/log" | sed 's/^/   /'
phones=$(curl -s "http://$api/metrics" | awk '/^suppressd_suppressed_subjects\{type="phone"\}/ {print $2}')
stop
echo "rebuild of $NUMBERS numbers: ready after ${ready_s}s, $phones suppressed phones"

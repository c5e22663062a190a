#!/usr/bin/env bash
# Throughput benchmark: builds the release binary, starts it on loopback with a temp data dir,
# and drives it with wrk (installed from Debian if missing) on the same machine:
#   1. durable LOX24 deliveries over HTTPS keep-alive, 64 concurrent connections;
#   2. single lookups over HTTP/1.1 keep-alive, 64 connections;
#   3. bulk POST /v1/check with 10,000 numbers per request.
# Prints wrk's figures and a summary. DURATION (seconds per phase, default 20) can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-20}

if ! command -v wrk >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq wrk
fi
cargo build --release --locked -q

work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
export BENCH_SECRET=bench-secret
printf '%s\n' "$BENCH_SECRET" > "$work/lox24.secret"
chmod 600 "$work/lox24.secret"
./target/release/suppressd serve --data-dir "$work/data" \
  --webhook-listen 127.0.0.1:0 --api-listen 127.0.0.1:0 \
  --lox24-secret-file "$work/lox24.secret" 2> "$work/log" &
pid=$!
for _ in $(seq 100); do grep -q "suppressd ready" "$work/log" && break; sleep 0.1; done
webhook=$(grep -o 'webhook=[0-9.:]*' "$work/log" | cut -d= -f2)
api=$(grep -o 'api=[0-9.:]*' "$work/log" | cut -d= -f2)

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== 1. durable LOX24 deliveries, HTTPS keep-alive, 64 connections, ${DURATION}s"
wrk -t2 -c64 -d"${DURATION}s" --latency -s benches/lox24.lua "https://$webhook/webhooks/lox24" | tee "$work/deliveries"
echo "== 2. single lookups, HTTP/1.1 keep-alive, 64 connections, ${DURATION}s"
wrk -t2 -c64 -d"${DURATION}s" --latency -s benches/lookup.lua "http://$api" | tee "$work/lookups"
echo "== 3. bulk check, 10,000 numbers per request, 4 connections, ${DURATION}s"
wrk -t2 -c4 -d"${DURATION}s" --latency -s benches/check.lua "http://$api/v1/check" | tee "$work/bulk"

rps() { awk '/Requests\/sec/ {print $2}' "$1"; }
p99() { awk '$1 == "99%" {print $2}' "$1"; }
flushes=$(curl -s "http://$api/metrics" | awk '/^suppressd_store_flush_duration_seconds_count/ {print $2}')
committed=$(curl -s "http://$api/metrics" | awk '/^suppressd_store_committed_requests_total/ {print $2}')
echo
echo "== summary"
printf 'durable deliveries: %s/s (p99 %s); %s requests in %s flushes\n' "$(rps "$work/deliveries")" "$(p99 "$work/deliveries")" "$committed" "$flushes"
printf 'single lookups:     %s/s (p99 %s)\n' "$(rps "$work/lookups")" "$(p99 "$work/lookups")"
printf 'bulk check:         %s numbers/s (p99 %s per 10,000)\n' "$(awk -v r="$(rps "$work/bulk")" 'BEGIN {printf "%.0f", r * 10000}')" "$(p99 "$work/bulk")"

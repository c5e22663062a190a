#!/usr/bin/env bash
# Throughput benchmark: builds the release binary, starts it on loopback with a temp data dir,
# and drives it with wrk (installed from Debian if missing) on the same machine:
#   1. durable LOX24 deliveries over HTTPS keep-alive, 64 concurrent connections;
#   2. importing IMPORT_LINES phone numbers (default 1,000,000) with `suppressd import`;
#   3. single lookups over HTTP/1.1 keep-alive, 64 connections, half of them for imported
#      (suppressed) numbers and half for numbers never seen (benches/lookup.lua); then (3b) all
#      of them for suppressed numbers, the slowest case;
#   4. bulk POST /v1/check with 10,000 numbers per request;
#   5. for reference, nginx answering a fixed JSON body to the same wrk script as phase 3, because
#      figures on a shared 2-core VM drift from run to run and the ratio is what carries over.
# Prints wrk's figures and a summary. DURATION (seconds per phase, default 20) can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-20}

if ! command -v wrk >/dev/null 2>&1 || ! command -v nginx >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq wrk nginx
fi
source benches/serve.sh
bench_setup
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; nginx -c "$work/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$work"' EXIT
bench_start

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
# The disk's synchronous-write latency bounds durable deliveries; on a shared VM it drifts.
dd if=/dev/zero of="$work/sync-probe" bs=16k count=16 2>/dev/null
TIMEFORMAT=%R
elapsed=$( { time dd if=/dev/zero of="$work/sync-probe" bs=16k count=500 oflag=dsync conv=notrunc >/dev/null 2>&1; } 2>&1 )
sync_us=$(awk -v e="$elapsed" 'BEGIN { printf "%.0f", e * 1000000 / 500 }')
echo "== disk: one 16 KiB O_DSYNC write takes ${sync_us} us"
echo "== 1. durable LOX24 deliveries, HTTPS keep-alive, 64 connections, ${DURATION}s"
wrk -t2 -c64 -d"${DURATION}s" --latency -s benches/lox24.lua "https://$webhook/webhooks/lox24" | tee "$work/deliveries"
IMPORT_LINES=${IMPORT_LINES:-1000000}
echo "== 2. import of ${IMPORT_LINES} phone numbers through suppressd import"
awk -v n="$IMPORT_LINES" 'BEGIN { for (i = 1; i <= n; i++) printf "+491%010d\n", 600000000 + i }' > "$work/numbers.txt"
TIMEFORMAT=%R
import_secs=$( { time ./target/release/suppressd --api "http://$api" import "$work/numbers.txt" >&2; } 2>&1 | tail -1 )

echo "== 3. single lookups, HTTP/1.1 keep-alive, 64 connections, half suppressed, ${DURATION}s"
SUPPRESSED_COUNT="$IMPORT_LINES" wrk -t2 -c64 -d"${DURATION}s" --latency -s benches/lookup.lua "http://$api" | tee "$work/lookups"
echo "== 3b. the same, every number suppressed (a database read and the reasons each), ${DURATION}s"
SUPPRESSED_SHARE=1 SUPPRESSED_COUNT="$IMPORT_LINES" wrk -t2 -c64 -d"${DURATION}s" --latency -s benches/lookup.lua "http://$api" | tee "$work/lookups-suppressed"
echo "== 4. bulk check, 10,000 numbers per request, 4 connections, ${DURATION}s"
wrk -t2 -c4 -d"${DURATION}s" --latency -s benches/check.lua "http://$api/v1/check" | tee "$work/bulk"

echo "== 5. reference: nginx returning a fixed JSON body, 64 connections, ${DURATION}s"
cat > "$work/nginx.conf" <<NGINX
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  server {
    listen 127.0.0.1:18099;
    location / { default_type application/json; return 200 '{"phone":"+4930123456","suppressed":false,"since":null,"reasons":[]}'; }
  }
}
NGINX
nginx -c "$work/nginx.conf"
sleep 0.5
wrk -t2 -c64 -d"${DURATION}s" --latency -s benches/lookup.lua http://127.0.0.1:18099 | tee "$work/nginx"

rps() { awk '/Requests\/sec/ {print $2}' "$1"; }
p99() { awk '$1 == "99%" {print $2}' "$1"; }
flushes=$(curl -s "http://$api/metrics" | awk '/^suppressd_store_flush_duration_seconds_count/ {print $2}')
committed=$(curl -s "http://$api/metrics" | awk '/^suppressd_store_committed_requests_total/ {print $2}')
echo
echo "== summary"
printf 'disk sync write:    %s us\n' "$sync_us"
printf 'durable deliveries: %s/s (p99 %s); %s requests in %s flushes\n' "$(rps "$work/deliveries")" "$(p99 "$work/deliveries")" "$committed" "$flushes"
printf 'single lookups:     %s/s (p99 %s), half suppressed\n' "$(rps "$work/lookups")" "$(p99 "$work/lookups")"
printf '  all suppressed:   %s/s (p99 %s)\n' "$(rps "$work/lookups-suppressed")" "$(p99 "$work/lookups-suppressed")"
printf 'nginx fixed body:   %s/s (p99 %s)\n' "$(rps "$work/nginx")" "$(p99 "$work/nginx")"
printf 'import:             %s numbers in %s s (%s/s)\n' "$IMPORT_LINES" "$import_secs" "$(awk -v n="$IMPORT_LINES" -v s="$import_secs" 'BEGIN { printf "%.0f", n / s }')"
printf 'bulk check:         %s numbers/s (p99 %s per 10,000)\n' "$(awk -v r="$(rps "$work/bulk")" 'BEGIN {printf "%.0f", r * 10000}')" "$(p99 "$work/bulk")"

#!/usr/bin/env bash
# Soak benchmark: loads SOAK_NUMBERS suppressed numbers (default 10,000,000) through
# `suppressd import`, then runs SOAK_SECONDS (default 600) of mixed load at once on loopback:
# single lookups (32 connections), bulk checks of 10,000 numbers (2 connections) and durable
# LOX24 deliveries over HTTPS where every 4th request is a retry of the one before (16
# connections). Every 10 s it samples the service's RSS and how many phones are suppressed. At
# the end it prints throughput and p50/p99/p99.9 per load, RSS over time, disk size and the
# highest RSS per suppressed number of any sample (the first is right after the import); then it
# SIGKILLs the service, restarts it and checks that the number of suppressed phones is the same
# (nothing acknowledged was lost), and prints its RSS once the restart has settled. CACHE_MB
# (default 256) is passed as --cache-mb. The loaded numbers (+49103…) are apart from the ones
# deliveries create (+49101…), so every accepted new delivery adds a suppressed phone.
set -euo pipefail
cd "$(dirname "$0")/.."
NUMBERS=${SOAK_NUMBERS:-10000000}
SECONDS_TOTAL=${SOAK_SECONDS:-600}
CACHE_MB=${CACHE_MB:-256}

command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
source benches/serve.sh
bench_setup
trap 'kill -9 "$pid" 2>/dev/null || true; kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; rm -rf "$work"' EXIT
start() { bench_start --cache-mb "$CACHE_MB"; }
rss_mb() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status"; }
suppressed_phones() {
  curl -s "http://$api/metrics" | awk '/^suppressd_suppressed_subjects\{type="phone"\}/ {print $2}'
}

start
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); --cache-mb $CACHE_MB"
echo "== loading $NUMBERS numbers"
awk -v n="$NUMBERS" 'BEGIN { for (i = 1; i <= n; i++) printf "+491%010d\n", 300000000 + i }' > "$work/numbers.txt"
TIMEFORMAT=%R
load_secs=$( { time ./target/release/suppressd --api "http://$api" import "$work/numbers.txt" >/dev/null; } 2>&1 | tail -1 )
rm "$work/numbers.txt"
echo "loaded in ${load_secs}s; RSS $(rss_mb) MiB; disk $(du -sm "$work/data" | cut -f1) MiB"

echo "== mixed load for ${SECONDS_TOTAL}s"
SUPPRESSED_BASE=300000000 SUPPRESSED_COUNT="$NUMBERS" wrk -t1 -c32 -d"${SECONDS_TOTAL}s" -s benches/lookup.lua "http://$api" > "$work/lookups" 2>&1 &
wrk -t1 -c2 -d"${SECONDS_TOTAL}s" -s benches/check.lua "http://$api/v1/check" > "$work/bulk" 2>&1 &
RETRY_EVERY=4 wrk -t1 -c16 -d"${SECONDS_TOTAL}s" -s benches/lox24.lua "https://$webhook/webhooks/lox24" > "$work/deliveries" 2> "$work/delivery-errors" &
echo "elapsed_s rss_mib phones" > "$work/rss"
for ((t = 0; t <= SECONDS_TOTAL; t += 10)); do
  echo "$t $(rss_mb) $(suppressed_phones)" >> "$work/rss"
  sleep 10
done
wait $(jobs -p | grep -v "^$pid$") 2>/dev/null || true

rps() { awk '/Requests\/sec/ {print $2}' "$1"; }
pct() { grep '^percentiles' "$1" | cut -d: -f2; }
phones=$(suppressed_phones)
disk_bytes=$(du -sb "$work/data" | cut -f1)
rss_end=$(rss_mb)
rss_max=$(awk 'NR > 1 && $2 > m {m = $2} END {print m}' "$work/rss")
echo
echo "== RSS over time (MiB)"
awk 'NR > 1 {printf "%s s: %s\n", $1, $2}' "$work/rss" | paste -sd'   ' | fold -w 100
echo
echo "== summary"
printf 'single lookups:   %s/s;%s\n' "$(rps "$work/lookups")" "$(pct "$work/lookups")"
printf 'bulk checks:      %s numbers/s;%s per 10,000\n' "$(awk -v r="$(rps "$work/bulk")" 'BEGIN {printf "%.0f", r * 10000}')" "$(pct "$work/bulk")"
printf 'deliveries:       %s/s (1 in 4 a retry);%s; non-200 answers: %s\n' "$(rps "$work/deliveries")" "$(pct "$work/deliveries")" "$(grep -c 'unexpected status' "$work/delivery-errors" || true)"
printf 'suppressed phones %s; RSS at end %s MiB (max %s); disk %s MiB\n' "$phones" "$rss_end" "$rss_max" "$((disk_bytes / 1048576))"
# Each sample's RSS over the suppressed phones at that moment: the list grows during the load.
awk -v d="$disk_bytes" -v n="$phones" 'NR > 1 && $3 > 0 {b = $2 * 1048576 / $3; if (b > m) m = b} END {printf "per suppressed number: at most %.1f B of RSS (of any sample), %.0f B on disk\n", m, d / n}' "$work/rss"
# The log and the snapshots are the list's truth, sled a view of it: their disk use apart.
for part in log snapshots db; do
  bytes=$(du -sb "$work/data/$part" 2>/dev/null | cut -f1)
  awk -v b="${bytes:-0}" -v n="$phones" -v p="$part" 'BEGIN {printf "  %s: %.0f B per suppressed number\n", p, b / n}'
done

kill -9 "$pid"
wait "$pid" 2>/dev/null || true
start
after=$(suppressed_phones)
if [ "$after" = "$phones" ]; then
  echo "after SIGKILL and restart: $after suppressed phones, nothing lost"
  # What a service holds once its import churn is behind it (as after an upgrade or reboot).
  sleep 10
  awk -v r="$(rss_mb)" -v n="$after" 'BEGIN {printf "RSS after the restart: %d MiB, %.1f B per suppressed number\n", r, r * 1048576 / n}'
else
  echo "after SIGKILL and restart: $after suppressed phones, expected $phones" >&2
  exit 1
fi

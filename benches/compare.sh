#!/usr/bin/env bash
# suppressd side by side with what users would pick instead, on this machine, in one
# interleaved run (peer, suppressd, peer, suppressd… for ROUNDS rounds), since this VM's absolute
# figures drift by ±25 % from one minute to the next:
#
#   1. single lookups, GET /v1/phones/{p} over HTTP/1.1 keep-alive, `wrk -t1 -c64`, half of them
#      for suppressed numbers  —  Redis SISMEMBER, `redis-benchmark -c64 -P1`, half hits; and
#      nginx answering a fixed JSON body to the same wrk script with 1 and with 2 workers;
#   2. bulk checks, POST /v1/check with 10,000 numbers a request on 1 connection, and the
#      text/plain stream of 1,000,000 lines  —  Redis SMISMEMBER, 1,000 a command, 64 in flight;
#      both driven by benches/bulk_client.rs, which counts hits in the raw bytes;
#   3. durable deliveries, LOX24 over HTTPS, 64 senders (`wrk -t2 -c64`), each a new event
#      fsynced before its 200  —  PostgreSQL `INSERT … ON CONFLICT DO NOTHING` with
#      synchronous_commit=on, `pgbench -c64 -j2`.
#
# Installs its peers from Debian (redis-server, redis-tools, postgresql, nginx, wrk), starts each
# on loopback in a temp directory, prints a table per comparison with both figures and the ratio
# for every round and the medians, and stops everything it started, by PID.
# COUNT numbers (default 1,000,000) are loaded into suppressd and Redis; DURATION (default 10)
# seconds per measurement; ROUNDS (default 3). BEFORE=<git revision> also builds that revision
# (in a worktree, into target/before) and measures it in the same rounds, so that a change is
# judged against the build before it under the same conditions.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-1000000}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
BEFORE=${BEFORE:-}

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v pgbench >/dev/null 2>&1 || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
pg_bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")

source benches/serve.sh
bench_setup
cargo bench --locked -q --bench bulk_client --no-run 2>/dev/null
bulk() { cargo bench --locked -q --bench bulk_client -- "$@" 2>/dev/null | tail -1; }
pids=()
cleanup() {
  for p in "${pids[@]}" ${pid:-}; do kill "$p" 2>/dev/null || true; done
  [ -n "${pg_data:-}" ] && su postgres -c "$pg_bin/pg_ctl -D $pg_data -m immediate stop" >/dev/null 2>&1 || true
  [ -n "$BEFORE" ] && git worktree remove --force "$work/before-src" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
figure() { awk -v k="$1" '{ for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) print substr($i, length(k) + 2) }'; }

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); build $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')${BEFORE:+, build before $(git rev-parse --short "$BEFORE")}"

# --- suppressd, with COUNT numbers loaded as suppressed ------------------------------------
awk -v n="$COUNT" 'BEGIN { for (i = 0; i < n; i++) printf "+49%012d\n", i }' > "$work/numbers.txt"
load() { # API: imports the numbers, then waits for the snapshot that import makes due
  ./target/release/suppressd --api "http://$1" import "$work/numbers.txt" >/dev/null
  # An import of a million numbers or more makes a snapshot due (--snapshot-every-events); it
  # is written in the background. Measure after it, in the steady state a service spends its
  # time in.
  if [ "$COUNT" -ge 1000000 ]; then
    for _ in $(seq 600); do
      curl -s "http://$1/metrics" | grep -q '^suppressd_store_snapshots_total [1-9]' && break
      sleep 0.5
    done
  fi
}
if [ -n "$BEFORE" ]; then
  git worktree add --detach "$work/before-src" "$BEFORE" >/dev/null 2>&1
  cargo build --release --locked -q --manifest-path "$work/before-src/Cargo.toml" \
    --target-dir target/before
  bench_bin=target/before/release/suppressd bench_name=before bench_start
  pids+=($pid)
  before_api=$api before_webhook=$webhook before_pid=$pid
  load "$before_api"
fi
bench_start
load "$api"

# --- Redis, the same numbers in one set ------------------------------------------------------
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
  --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.1; done
awk -v n="$COUNT" 'BEGIN { for (i = 0; i < n; i += 1000) { printf "SADD suppressed"; for (j = i; j < i + 1000 && j < n; j++) printf " %012d", j; printf "\n" } }' |
  redis-cli -p "$redis_port" >/dev/null

# --- nginx, a fixed body where suppressd answers a lookup, 1 and 2 workers ------------------------
nginx_conf() {
  local workers=$1 port=$2
  cat > "$work/nginx-$workers.conf" <<EOF
worker_processes $workers;
pid $work/nginx-$workers.pid;
error_log $work/nginx-$workers.error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 60s;
  server {
    listen 127.0.0.1:$port;
    location /v1/phones/ {
      default_type application/json;
      return 200 '{"phone":"+49000000000001","suppressed":false,"since":null,"reasons":[]}';
    }
  }
}
EOF
}
for workers in 1 2; do
  port=$(free_port)
  nginx_conf "$workers" "$port"
  nginx -c "$work/nginx-$workers.conf" -p "$work" &
  pids+=($!)
  eval "nginx${workers}_port=$port"
done

# --- PostgreSQL, synchronous commits ------------------------------------------------------------
pg_data="$work/pg"
pg_port=$(free_port)
mkdir -p "$pg_data" && chown postgres "$work" "$pg_data" 2>/dev/null || true
chmod 755 "$work"
su postgres -c "$pg_bin/initdb -D $pg_data -A trust -U postgres" >/dev/null
su postgres -c "$pg_bin/pg_ctl -D $pg_data -l $pg_data/log -w -o \"-p $pg_port -k $pg_data -c listen_addresses=127.0.0.1 -c synchronous_commit=on -c fsync=on -c max_connections=100 -c shared_buffers=256MB\" start" >/dev/null
psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -c \
  "CREATE TABLE suppressions (phone text PRIMARY KEY, source text NOT NULL, event_id uuid NOT NULL, event_time bigint NOT NULL, details jsonb NOT NULL)"
cat > "$work/insert.sql" <<'EOF'
\set n random(1, 999999999999)
INSERT INTO suppressions VALUES ('+49' || lpad(:n::text, 12, '0'), 'lox24', gen_random_uuid(), 1757849748, '{"user_id":2,"campaign_code":"3KCKb5nMD","reason":{"id":4,"label":"Es ist unverständlich"},"additional_text":"zusätzlicher Benutzertext","short_link_code":"baaIou","unsubscribe_request_id":59}') ON CONFLICT DO NOTHING;
EOF

# --- the measurements ---------------------------------------------------------------------------
run_wrk() { # URL SCRIPT THREADS → "rate p99_ms"
  wrk -t"$3" -c64 -d"${DURATION}s" --latency -s "$2" "$1" > "$work/wrk" 2>&1
  local rate p99
  rate=$(awk '/Requests\/sec/ {print $2}' "$work/wrk")
  p99=$(awk '$1 == "99%" { v = $2; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 } printf "%.2f", v }' "$work/wrk")
  echo "$rate $p99"
}
redis_lookups() {
  redis-benchmark -p "$redis_port" -c 64 -P 1 -n $((DURATION * 150000)) -r $((2 * COUNT)) \
    SISMEMBER suppressed __rand_int__ > "$work/rb" 2>&1
  awk '/throughput summary/ {r = $3} /latency summary/ {getline; getline; p = $5} END {printf "%s %s\n", r, p}' "$work/rb"
}
pg_deliveries() {
  pgbench -n -h 127.0.0.1 -p "$pg_port" -U postgres -c 64 -j 2 -T "$DURATION" -r -f "$work/insert.sql" postgres > "$work/pgb" 2>&1
  awk '/^tps/ {t = $3} /latency average/ {a = $4} END {printf "%.0f %s\n", t, a}' "$work/pgb"
}

# Deliveries leave sled flushing their writes for seconds; the next measurement waits until the
# service is idle again (under 5 % of a core, at most 30 s), so it does not pay for them.
settle() { # PID
  local before after
  for _ in $(seq 30); do
    before=$(awk '{print $14 + $15}' "/proc/$1/stat")
    sleep 1
    after=$(awk '{print $14 + $15}' "/proc/$1/stat")
    [ $((after - before)) -le 5 ] && return
  done
}
declare -A results
for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  results[redis_lookup,$round]=$(redis_lookups)
  results[s_lookup,$round]=$(COMPARE_COUNT=$COUNT run_wrk "http://$api/v1/phones/" benches/compare-lookup.lua 1)
  if [ -n "$BEFORE" ]; then
    results[b_lookup,$round]=$(COMPARE_COUNT=$COUNT run_wrk "http://$before_api/v1/phones/" benches/compare-lookup.lua 1)
  fi
  results[nginx1,$round]=$(COMPARE_COUNT=$COUNT run_wrk "http://127.0.0.1:$nginx1_port/v1/phones/" benches/compare-lookup.lua 1)
  results[nginx2,$round]=$(COMPARE_COUNT=$COUNT run_wrk "http://127.0.0.1:$nginx2_port/v1/phones/" benches/compare-lookup.lua 1)
  results[redis_bulk,$round]=$(bulk redis "127.0.0.1:$redis_port" "$COUNT" "$DURATION" | figure numbers/s)
  results[s_bulk,$round]=$(bulk suppressd-json "$api" "$COUNT" "$DURATION" | figure numbers/s)
  results[s_stream,$round]=$(bulk suppressd-text "$api" "$COUNT" "$DURATION" | figure numbers/s)
  if [ -n "$BEFORE" ]; then
    results[b_bulk,$round]=$(bulk suppressd-json "$before_api" "$COUNT" "$DURATION" | figure numbers/s)
    results[b_stream,$round]=$(bulk suppressd-text "$before_api" "$COUNT" "$DURATION" | figure numbers/s)
  fi
  results[pg,$round]=$(pg_deliveries)
  results[s_deliveries,$round]=$(run_wrk "https://$webhook/webhooks/lox24" benches/lox24.lua 2)
  settle "$pid"
  if [ -n "$BEFORE" ]; then
    results[b_deliveries,$round]=$(run_wrk "https://$before_webhook/webhooks/lox24" benches/lox24.lua 2)
    settle "$before_pid"
  fi
done

# --- the table ------------------------------------------------------------------------------------
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
row() { # LABEL KEY_S KEY_PEER FIELD
  local label=$1 s=$2 peer=$3 field=$4 ratios=() r
  for round in $(seq "$ROUNDS"); do
    local a b
    a=$(echo "${results[$s,$round]}" | awk -v f="$field" '{print $f}')
    b=$(echo "${results[$peer,$round]}" | awk -v f="$field" '{print $f}')
    r=$(awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    ratios+=("$r")
    printf '| %s | %s | %s | %s | %s |\n' "$label" "$round" "$a" "$b" "$r"
  done
  printf '| %s | median | %s | %s | **%s** |\n' "$label" \
    "$(for round in $(seq "$ROUNDS"); do echo "${results[$s,$round]}" | awk -v f="$field" '{print $f}'; done | median)" \
    "$(for round in $(seq "$ROUNDS"); do echo "${results[$peer,$round]}" | awk -v f="$field" '{print $f}'; done | median)" \
    "$(printf '%s\n' "${ratios[@]}" | median)"
}
echo
echo "| work (per second) | round | suppressd | peer | ratio |"
echo "| --- | --- | --- | --- | --- |"
row "lookups vs Redis SISMEMBER" s_lookup redis_lookup 1
row "lookups vs nginx, 1 worker" s_lookup nginx1 1
row "lookups vs nginx, 2 workers" s_lookup nginx2 1
row "bulk JSON numbers vs Redis SMISMEMBER" s_bulk redis_bulk 1
row "bulk text/plain numbers vs Redis SMISMEMBER" s_stream redis_bulk 1
row "durable deliveries vs PostgreSQL inserts" s_deliveries pg 1
if [ -n "$BEFORE" ]; then
  row "build before: lookups vs Redis SISMEMBER" b_lookup redis_lookup 1
  row "build before: lookups vs nginx, 2 workers" b_lookup nginx2 1
  row "build before: bulk JSON numbers vs Redis SMISMEMBER" b_bulk redis_bulk 1
  row "build before: bulk text/plain numbers vs Redis SMISMEMBER" b_stream redis_bulk 1
  row "build before: durable deliveries vs PostgreSQL inserts" b_deliveries pg 1
fi
echo
echo "| p99 latency (ms) | round | suppressd | peer |"
echo "| --- | --- | --- | --- |"
for round in $(seq "$ROUNDS"); do
  printf '| lookups vs Redis | %s | %s | %s |\n' "$round" "$(echo "${results[s_lookup,$round]}" | cut -d' ' -f2)" "$(echo "${results[redis_lookup,$round]}" | cut -d' ' -f2)"
  printf '| lookups vs nginx, 1 worker (same wrk script) | %s | %s | %s |\n' "$round" "$(echo "${results[s_lookup,$round]}" | cut -d' ' -f2)" "$(echo "${results[nginx1,$round]}" | cut -d' ' -f2)"
  printf '| deliveries vs PostgreSQL (average) | %s | %s | %s |\n' "$round" "$(echo "${results[s_deliveries,$round]}" | cut -d' ' -f2)" "$(echo "${results[pg,$round]}" | cut -d' ' -f2)"
  if [ -n "$BEFORE" ]; then
    printf '| build before: lookups vs Redis | %s | %s | %s |\n' "$round" "$(echo "${results[b_lookup,$round]}" | cut -d' ' -f2)" "$(echo "${results[redis_lookup,$round]}" | cut -d' ' -f2)"
  fi
done

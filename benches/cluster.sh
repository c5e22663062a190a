#!/usr/bin/env bash
# A three-node cluster beside one node alone, in one interleaved run (alone, cluster, alone,
# cluster… for ROUNDS rounds, DURATION seconds each, default 3 × 15 s):
#   - durable LOX24 deliveries over HTTPS, `wrk -t2 -c64`, every request a new event: alone, to
#     the one node; on the cluster, to node a (each delivery fsynced in a's log and acknowledged
#     by a quorum of the 3-replica stream before its 200, then applied by b and c too);
#   - single lookups on one node, `wrk -t1 -c64`, half of them suppressed numbers (COUNT
#     imported beforehand; on the cluster they reach every node through the stream).
# Three nats-server processes (Debian's package, installed if missing) form the JetStream
# cluster on loopback. Everything runs on this machine's cores, servers and load generators
# alike. Prints a table per round and stops everything it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-15}
COUNT=${COUNT:-200000}

PATH="$PATH:/usr/sbin:/sbin"
need=()
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
source benches/serve.sh
bench_setup
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- three nats-server processes, one JetStream cluster -------------------------------------
nats_ports=() route_ports=()
for i in 0 1 2; do nats_ports+=("$(free_port)"); route_ports+=("$(free_port)"); done
routes=$(printf '"nats-route://127.0.0.1:%s", ' "${route_ports[@]}")
for i in 0 1 2; do
  cat > "$work/nats-$i.conf" <<EOF
server_name: "n$i"
listen: "127.0.0.1:${nats_ports[$i]}"
jetstream { store_dir: "$work/js-$i" }
cluster { name: "bench", listen: "127.0.0.1:${route_ports[$i]}", routes: [${routes%, }] }
EOF
  nats-server -c "$work/nats-$i.conf" > "$work/nats-$i.log" 2>&1 &
  pids+=($!)
done
nats_urls=$(printf 'nats://127.0.0.1:%s,' "${nats_ports[@]}")
nats_urls=${nats_urls%,}

# node NAME [FLAGS…]: starts one node in $work/NAME; sets ${NAME}_api and ${NAME}_webhook.
node() {
  local name=$1
  shift
  ./target/release/suppressd serve --data-dir "$work/$name" --webhook-listen 127.0.0.1:0 \
    --api-listen 127.0.0.1:0 --lox24-secret-file "$work/lox24.secret" "$@" 2> "$work/$name.log" &
  pids+=($!)
  for _ in $(seq 600); do grep -q "suppressd ready" "$work/$name.log" && break; sleep 0.1; done
  eval "${name}_api=$(grep -o 'api=[0-9.:]*' "$work/$name.log" | cut -d= -f2)"
  eval "${name}_webhook=$(grep -o 'webhook=[0-9.:]*' "$work/$name.log" | cut -d= -f2)"
}
node alone
for name in a b c; do node "$name" --cluster-nats "$nats_urls" --node-name "$name"; done
for name in a b c; do
  api_var="${name}_api"
  for _ in $(seq 300); do
    curl -s "http://${!api_var}/healthz" | grep -q '"cluster":"connected"' && break
    sleep 0.2
  done
done

awk -v n="$COUNT" 'BEGIN { for (i = 0; i < n; i++) printf "+49%012d\n", i }' > "$work/numbers.txt"
./target/release/suppressd --api "http://$alone_api" import "$work/numbers.txt" >/dev/null
./target/release/suppressd --api "http://$a_api" import "$work/numbers.txt" >/dev/null
for name in b c; do
  api_var="${name}_api"
  for _ in $(seq 600); do
    phones=$(curl -s "http://${!api_var}/metrics" | awk '/^suppressd_suppressed_subjects\{type="phone"\}/ {print $2}')
    [ "${phones:-0}" -ge "$COUNT" ] && break
    sleep 0.5
  done
done

deliveries() { # WEBHOOK → "rate p99"
  wrk -t2 -c64 -d"${DURATION}s" --latency -s benches/lox24.lua "https://$1/webhooks/lox24" > "$work/wrk" 2>&1
  echo "$(awk '/Requests\/sec/ {print $2}' "$work/wrk") $(awk '$1 == "99%" {print $2}' "$work/wrk")"
}
lookups() { # API → "rate p99"
  COMPARE_COUNT=$COUNT wrk -t1 -c64 -d"${DURATION}s" --latency -s benches/compare-lookup.lua "http://$1/v1/phones/" > "$work/wrk" 2>&1
  echo "$(awk '/Requests\/sec/ {print $2}' "$work/wrk") $(awk '$1 == "99%" {print $2}' "$work/wrk")"
}

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); build $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'); nats-server $(nats-server --version | awk '{print $2}')"
printf '| round | work | one node alone | 3-node cluster (3-replica stream) | ratio |\n| --- | --- | --- | --- | --- |\n'
for round in $(seq "$ROUNDS"); do
  read -r alone_rate alone_p99 < <(deliveries "$alone_webhook")
  read -r cluster_rate cluster_p99 < <(deliveries "$a_webhook")
  printf '| %s | durable deliveries/s (p99) | %s (%s) | %s (%s) | %s |\n' "$round" "$alone_rate" "$alone_p99" \
    "$cluster_rate" "$cluster_p99" "$(awk -v a="$cluster_rate" -v b="$alone_rate" 'BEGIN { printf "%.2f", a / b }')"
  read -r alone_rate alone_p99 < <(lookups "$alone_api")
  read -r cluster_rate cluster_p99 < <(lookups "$b_api")
  printf '| %s | lookups/s on one node (p99) | %s (%s) | %s (%s), node b | %s |\n' "$round" "$alone_rate" "$alone_p99" \
    "$cluster_rate" "$cluster_p99" "$(awk -v a="$cluster_rate" -v b="$alone_rate" 'BEGIN { printf "%.2f", a / b }')"
done
for name in a b c; do
  api_var="${name}_api"
  echo "node $name: $(curl -s "http://${!api_var}/metrics" | grep -E '^suppressd_cluster_(published|replicated|pending)' | tr '\n' ' ')"
done

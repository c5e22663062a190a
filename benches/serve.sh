# Sourced by the benchmark scripts: a release build and one suppressd on loopback.
#
# `bench_setup` builds the binary, makes the scratch directory $work and the LOX24 secret the wrk
# scripts send (BENCH_SECRET). `bench_start [FLAGS…]` starts `suppressd serve` on ephemeral ports
# with its data in $work/data and the extra flags, waits until it is ready (a large data
# directory takes a while to open; up to 10 minutes) and sets $pid, $webhook and $api.
# $bench_bin and $bench_name, when set, start another build (its data in $work/$bench_name).

bench_setup() {
  cargo build --release --locked -q
  work=$(mktemp -d)
  pid=
  export BENCH_SECRET=bench-secret
  printf '%s\n' "$BENCH_SECRET" > "$work/lox24.secret"
  chmod 600 "$work/lox24.secret"
}

bench_start() {
  local name=${bench_name:-data}
  # Emptied first: a restart must not read the ports of the run before from its log.
  : > "$work/$name.log"
  "${bench_bin:-./target/release/suppressd}" serve --data-dir "$work/$name" \
    --webhook-listen 127.0.0.1:0 --api-listen 127.0.0.1:0 \
    --lox24-secret-file "$work/lox24.secret" "$@" 2> "$work/$name.log" &
  pid=$!
  for _ in $(seq 6000); do grep -q "suppressd ready" "$work/$name.log" && break; sleep 0.1; done
  webhook=$(grep -o 'webhook=[0-9.:]*' "$work/$name.log" | cut -d= -f2)
  api=$(grep -o 'api=[0-9.:]*' "$work/$name.log" | cut -d= -f2)
}

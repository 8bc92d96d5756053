#!/usr/bin/env bash
# Runs the Tern benchmarks and the same workload against NATS's WebSocket listener, and
# prints both sets of figures side by side with their ratio.
#
#   bench/compare-nats.sh [extra `tern bench` flags, e.g. --duration 5s]
#
# Installs Debian's nats-server when it is missing (needs root or sudo), starts it on
# loopback, and stops it (by PID) when done.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/nats-common.sh

port=$((20000 + RANDOM % 20000))
conf=$(mktemp --suffix=.conf)
cat >"$conf" <<CONF
listen: "127.0.0.1:$((port + 1))"
max_connections: 100000
max_pending: 67108864
websocket {
  listen: "127.0.0.1:$port"
  no_tls: true
  compression: false
}
CONF

nats-server -c "$conf" >/tmp/tern-bench-nats.log 2>&1 &
nats_pid=$!
cleanup() { kill "$nats_pid" 2>/dev/null || true; wait "$nats_pid" 2>/dev/null || true; rm -f "$conf"; }
trap cleanup EXIT

for _ in $(seq 1 50); do
  (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

echo "nats-server $(nats-server --version 2>&1 | head -1) pid $nats_pid on ws://127.0.0.1:$port" >&2
target/release/tern bench --nats-url "ws://127.0.0.1:$port" --nats-pid "$nats_pid" "$@"

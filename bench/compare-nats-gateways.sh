#!/usr/bin/env bash
# One hop between servers, Tern vs NATS: two Tern nodes joined by the backbone, and three
# NATS servers as three clusters joined by gateways (publisher on the first, subscriber on
# the second). Prints messages/s over one link and the latency the hop adds, side by side.
#
#   bench/compare-nats-gateways.sh [extra `tern bench backbone` flags]
#
# Installs Debian's nats-server when missing (needs root or sudo) and stops the servers it
# started (by PID) when done.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/nats-common.sh

base=$((20000 + RANDOM % 20000))
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

for i in 1 2 3; do
  gws=""
  for j in 1 2 3; do
    [ "$i" = "$j" ] && continue
    gws="$gws { name: \"c$j\", url: \"nats://127.0.0.1:$((base + 30 + j))\" },"
  done
  cat >"$dir/n$i.conf" <<CONF
server_name: "n$i"
listen: "127.0.0.1:$((base + 10 + i))"
websocket { listen: "127.0.0.1:$((base + 20 + i))", no_tls: true, compression: false }
gateway { name: "c$i", listen: "127.0.0.1:$((base + 30 + i))", gateways: [ ${gws%,} ] }
CONF
  nats-server -c "$dir/n$i.conf" >"$dir/n$i.log" 2>&1 &
  pids+=("$!")
done
for i in 1 2 3; do
  for _ in $(seq 1 50); do
    (echo >"/dev/tcp/127.0.0.1/$((base + 20 + i))") 2>/dev/null && break
    sleep 0.1
  done
done
sleep 1 # gateways connect
target/release/tern bench backbone \
  --nats-url "ws://127.0.0.1:$((base + 21))" --nats-remote-url "ws://127.0.0.1:$((base + 22))" "$@"

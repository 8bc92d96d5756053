#!/usr/bin/env bash
# Starts a local three-region cluster (eu-west, us-east, ap-south) on loopback, joined by the
# QUIC backbone with mutual TLS. Ctrl-C (or SIGTERM) stops the three nodes cleanly.
#
#   deploy/local/cluster.sh
#
# Clients: ws://127.0.0.1:7400 (eu-west), ws://127.0.0.1:7410 (us-east),
#          ws://127.0.0.1:7420 (ap-south); the demo chat at http://127.0.0.1:7400/demo/ (and
#          7410, 7420: open two to chat across regions). Development certificates are made on first run
# in deploy/local/certs/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release --quiet
tern=target/release/tern
certs=deploy/local/certs
if [ ! -f "$certs/ca.pem" ]; then
  "$tern" certs init --dir "$certs"
  for r in eu-west us-east ap-south; do "$tern" certs node "$r/edge-1" --dir "$certs"; done
fi

pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping ${pids[*]}" >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

for r in eu-west us-east ap-south; do
  "$tern" edge --config "deploy/local/$r.toml" &
  pids+=("$!")
done
echo "cluster up: eu-west ws://127.0.0.1:7400, us-east ws://127.0.0.1:7410, ap-south ws://127.0.0.1:7420 (Ctrl-C stops)" >&2
echo "demo chat: http://127.0.0.1:7400/demo/ (eu-west), http://127.0.0.1:7410/demo/ (us-east), http://127.0.0.1:7420/demo/ (ap-south)" >&2
wait

#!/usr/bin/env bash
# Starts a local three-region cluster (eu-west, us-east, ap-south) on loopback, joined by the
# QUIC backbone with mutual TLS, each node keeping a durable log of the `chat` namespace (so
# history, rewind and cross-region resume can be tried). Ctrl-C, SIGINT or SIGTERM stops the
# three nodes cleanly, however the script was started (in a terminal, or in the background
# from another script).
#
#   deploy/local/cluster.sh
#
# Clients: ws://127.0.0.1:7400 (eu-west), ws://127.0.0.1:7410 (us-east),
#          ws://127.0.0.1:7420 (ap-south); the demo chat at http://127.0.0.1:7400/demo/ (and
#          7410, 7420: open two to chat across regions).
# Environment:
#   CARGO_TARGET_DIR   where cargo builds (default target/): the binary is taken from there
#   TERN_SKIP_BUILD=1  do not build; use $CARGO_TARGET_DIR/release/tern as it is
#   TERN_CLUSTER_DATA  the nodes' data directories (default deploy/local/data/REGION)
# Development certificates are made on first run in deploy/local/certs/ (not committed).
set -euo pipefail

# A script started in the background by a non-interactive shell gets SIGINT ignored, and
# bash cannot trap a signal ignored on entry: start again with the default disposition.
if [ -z "${TERN_CLUSTER_REEXEC:-}" ] && env --default-signal=INT true 2>/dev/null; then
  export TERN_CLUSTER_REEXEC=1
  exec env --default-signal=INT "$0" "$@"
fi

cd "$(dirname "$0")/../.."
say() { printf 'cluster: %s\n' "$*" >&2; }

tern="${CARGO_TARGET_DIR:-target}/release/tern"
if [ -z "${TERN_SKIP_BUILD:-}" ]; then
  say "building tern (cargo build --release --bin tern; the first build takes several minutes)"
  cargo build --release --bin tern
fi
[ -x "$tern" ] || { say "error: $tern not found (build it, or unset TERN_SKIP_BUILD)"; exit 1; }
data="${TERN_CLUSTER_DATA:-deploy/local/data}"

certs=deploy/local/certs
if [ ! -f "$certs/ca.pem" ]; then
  say "making development certificates in $certs"
  "$tern" certs init --dir "$certs"
  for r in eu-west us-east ap-south; do "$tern" certs node "$r/edge-1" --dir "$certs"; done
fi

pids=()
stop() {
  trap - INT TERM EXIT
  if ((${#pids[@]} > 0)); then
    say "stopping ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  exit 0
}
trap stop INT TERM EXIT

for r in eu-west us-east ap-south; do
  say "starting $r (log: stderr; data: $data/$r)"
  "$tern" edge --config "deploy/local/$r.toml" --data-dir "$data/$r" &
  pids+=("$!")
done
say "cluster up: eu-west ws://127.0.0.1:7400, us-east ws://127.0.0.1:7410, ap-south ws://127.0.0.1:7420 (Ctrl-C stops)"
say "demo chat: http://127.0.0.1:7400/demo/ (eu-west), http://127.0.0.1:7410/demo/ (us-east), http://127.0.0.1:7420/demo/ (ap-south)"
say "history: curl 'http://127.0.0.1:7410/v1/channels/chat:lobby/messages' (the chat namespace is logged and replicated)"
wait

#!/usr/bin/env bash
# Runs the chaos test (tests/chaos.rs) over N seeds (default 50), one after another, and
# prints each run's summary line. Stops at the first failure and prints how to replay it.
# Usage: tests/chaos-seeds.sh [N] [FIRST_SEED]   (seeds FIRST_SEED, FIRST_SEED+1, …; random
# FIRST_SEED when omitted).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-50}"
first="${2:-$(( (RANDOM << 16) | RANDOM ))}"
cargo test --test chaos --no-run >/dev/null 2>&1
bin=$(cargo test --test chaos --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*chaos[^"]*\)".*/\1/p' | tail -1)
passed=0
for ((k = 0; k < n; k++)); do
    seed=$((first + k))
    if ! out=$(TERN_CHAOS_SEED="$seed" "$bin" --nocapture 2>&1); then
        echo "$out" | tail -40
        echo "FAILED at seed $seed after $passed passing seeds; replay: TERN_CHAOS_SEED=$seed cargo test --test chaos -- --nocapture"
        exit 1
    fi
    echo "$out" | grep "^chaos seed $seed:" || true
    passed=$((passed + 1))
done
echo "$passed of $n seeds passed (seeds $first..$((first + n - 1)))"

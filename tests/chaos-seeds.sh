#!/usr/bin/env bash
# Runs the chaos test (tests/chaos.rs) over N seeds (default 50), one after another, and
# prints each run's summary line. A failing run's whole output is kept in
# target/chaos-seeds/seed-SEED.log; the script goes on and exits non-zero if any failed.
# Usage: tests/chaos-seeds.sh [N] [FIRST_SEED]   (seeds FIRST_SEED, FIRST_SEED+1, …; random
# FIRST_SEED when omitted). Timing varies between runs: a seed replays the choices only.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-50}"
first="${2:-$(( (RANDOM << 16) | RANDOM ))}"
bin=$(cargo test -p tern --test integration --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*integration[^"]*\)".*/\1/p' | tail -1)
mkdir -p target/chaos-seeds
passed=0
failed=()
for ((k = 0; k < n; k++)); do
    seed=$((first + k))
    if out=$(TERN_CHAOS_SEED="$seed" RUST_BACKTRACE=0 "$bin" chaos:: --nocapture 2>&1); then
        echo "$out" | grep "^chaos seed $seed:" || true
        passed=$((passed + 1))
    else
        echo "$out" > "target/chaos-seeds/seed-$seed.log"
        echo "seed $seed FAILED:"
        echo "$out" | grep -E "panicked|plain subscriber|SDK subscriber|log:" | cut -c1-300 | head -20
        failed+=("$seed")
    fi
done
echo "$passed of $n seeds passed (seeds $first..$((first + n - 1)))"
if ((${#failed[@]} > 0)); then
    echo "failed: ${failed[*]} (logs in target/chaos-seeds/; replay: TERN_CHAOS_SEED=SEED cargo test --test integration chaos:: -- --nocapture)"
    exit 1
fi

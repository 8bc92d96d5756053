#!/usr/bin/env bash
# Every test, as CI runs it (.ci/run): the Rust workspace (unit, end-to-end, fault suite),
# then the JavaScript tests in js/ (headless Chromium from Debian against the tern binary the
# Rust step built). Installs what the JavaScript tests need (Debian's chromium, npm packages
# from js/package-lock.json) when missing: see scripts/test-js.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
scripts/test-js.sh

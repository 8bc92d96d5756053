#!/usr/bin/env bash
# Every test, as CI runs it (.ci/run): the Rust workspace (unit, end-to-end, fault suite),
# then the JavaScript tests in js/ (headless Chromium from Debian against the tern binary the
# Rust step built), with the deployment files checked between them (deploy/validate.sh:
# Kubernetes and compose schemas, node configs, the systemd unit). Installs what the tests
# need when missing: promtool (Debian's
# `prometheus` package, which checks the /metrics exposition; best effort: without it that
# check is skipped and says so), and for the JavaScript tests Debian's chromium and the npm
# packages from js/package-lock.json (see scripts/test-js.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
    if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
        echo "test: installing promtool (apt-get install prometheus)" >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus </dev/null >/dev/null 2>&1 ||
            { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update </dev/null >/dev/null 2>&1 &&
              $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus </dev/null >/dev/null 2>&1; } ||
            echo "test: could not install promtool; the metrics test will skip its promtool check" >&2
    fi
fi

cargo test --workspace --locked --features tern/otlp "$@"
deploy/validate.sh
scripts/test-js.sh

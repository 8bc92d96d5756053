#!/usr/bin/env bash
# Runs the JavaScript tests in js/: the TypeScript SDK's build check (bundle budget, the
# demo's embedded copy current), lint, unit tests (vitest), the SDK in Node against a real
# `tern edge`, and the browser acceptance tests in js/test/browser/ (headless Chromium from
# Debian driven by playwright-core against real nodes).
#
# Assumes the tern binary is already built: `cargo build` (or `cargo test --workspace`, as
# .ci/run does) makes target/debug/tern. The tests take TERN_BIN, else
# $CARGO_TARGET_DIR/debug/tern, else <repo>/target/debug/tern.
#
# On a fresh machine it installs what the tests need:
#   - Chromium from Debian (apt-get install chromium) when /usr/bin/chromium is missing;
#     no browser is ever downloaded by npm or Playwright.
#   - Node.js and npm from Debian when node is missing (Node.js >= 20 is required; the script
#     stops with a message if the one it finds or installs is older).
#   - js/node_modules with `npm ci` (from js/package-lock.json).
# apt-get runs directly as root, through sudo otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
JS="$ROOT/js"
NODE_MIN_MAJOR=20

say() { printf 'test-js: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# apt_install PKG...: install, and on failure refresh the package lists once and retry.
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand"
    say "installing $* (apt-get)"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" </dev/null; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update </dev/null
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" </dev/null
    fi
}

# The tern binary (built beforehand, see above).
TERN_BIN="${TERN_BIN:-}"
if [ -z "$TERN_BIN" ]; then
    if [ -n "${CARGO_TARGET_DIR:-}" ]; then
        case "$CARGO_TARGET_DIR" in
            /*) TERN_BIN="$CARGO_TARGET_DIR/debug/tern" ;;
            *) TERN_BIN="$ROOT/$CARGO_TARGET_DIR/debug/tern" ;;
        esac
    else
        TERN_BIN="$ROOT/target/debug/tern"
    fi
fi
[ -x "$TERN_BIN" ] || die "tern binary not found at $TERN_BIN: run 'cargo build' (or set TERN_BIN) first"
export TERN_BIN

# Chromium from Debian.
if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
fi
[ -x /usr/bin/chromium ] || die "/usr/bin/chromium still missing after apt-get install chromium"

# Node.js >= 20 and npm.
if ! command -v node >/dev/null 2>&1; then
    apt_install nodejs npm
fi
command -v node >/dev/null 2>&1 || die "node not found; install Node.js >= $NODE_MIN_MAJOR"
NODE_VERSION="$(node --version)"
NODE_MAJOR="${NODE_VERSION#v}"
NODE_MAJOR="${NODE_MAJOR%%.*}"
if ! [ "$NODE_MAJOR" -ge "$NODE_MIN_MAJOR" ] 2>/dev/null; then
    die "Node.js $NODE_VERSION at $(command -v node) is too old: these tests need Node.js >= $NODE_MIN_MAJOR (Debian 12's nodejs package is 18; use a newer Debian or another source of Node.js $NODE_MIN_MAJOR+)"
fi
if ! command -v npm >/dev/null 2>&1; then
    apt_install npm
fi
command -v npm >/dev/null 2>&1 || die "npm not found"

say "node $NODE_VERSION, npm $(npm --version), $(/usr/bin/chromium --version 2>/dev/null | head -n1), tern $TERN_BIN"

cd "$JS"
npm ci --no-audit --no-fund
# The SDK: the bundle within its budget and the demo's copy current, lint and format,
# unit tests, the SDK in Node against a real node, then Chromium.
npm run check
npm run lint
npm run docs
npm run test:unit
# Node 20 has WebSocket behind a flag; 22 and later have it by default.
if [ "$NODE_MAJOR" -lt 22 ]; then export NODE_OPTIONS="${NODE_OPTIONS:-} --experimental-websocket"; fi
npm run test:node
npm run test:browser

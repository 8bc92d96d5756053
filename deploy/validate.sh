#!/usr/bin/env bash
# Validates the deployment files (run by scripts/test.sh after the Rust tests):
#   - the Kubernetes manifests (deploy/kubernetes/*.yaml) against the Kubernetes schemas,
#     strictly (unknown fields are errors), with kubernetes-validate from PyPI;
#   - deploy/compose.yaml against the compose specification (check-jsonschema's vendored
#     compose-spec schema, PyPI);
#   - every node configuration they carry (deploy/compose/*.toml, each region's Secret) with
#     the node's own parser: `tern edge --config FILE --check`;
#   - the systemd unit with `systemd-analyze verify`, where systemd is installed.
# The Python tools go into a virtualenv under the target directory (pinned versions).
# Usage: deploy/validate.sh [TERN_BIN]   (default: $CARGO_TARGET_DIR/debug/tern, else target/debug/tern)
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'validate: %s\n' "$*" >&2; }

target="${CARGO_TARGET_DIR:-target}"
tern="${1:-${TERN_BIN:-$target/debug/tern}}"
[ -x "$tern" ] || { say "error: $tern not found (cargo build first)"; exit 1; }
venv="$target/deploy-venv"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/check-jsonschema" ]; then
    say "installing kubernetes-validate and check-jsonschema into $venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian keeps venv in its own package.
        sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv </dev/null >/dev/null
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        kubernetes-validate==1.37.0 check-jsonschema==0.39.0
fi

say "Kubernetes manifests (schemas of Kubernetes 1.30, strict)"
"$venv/bin/kubernetes-validate" --quiet --strict --kubernetes-version 1.30 \
    deploy/kubernetes/namespace.yaml deploy/kubernetes/eu-west.yaml \
    deploy/kubernetes/us-east.yaml deploy/kubernetes/ap-south.yaml

say "compose file (compose specification)"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
say "node configurations"
for f in deploy/compose/*.toml deploy/local/*.toml deploy/edge.example.toml; do
    "$tern" edge --config "$f" --check >/dev/null || { say "error: $f"; exit 1; }
done
for r in eu-west us-east ap-south; do
    "$venv/bin/python" - "deploy/kubernetes/$r.yaml" "$tmp/$r.toml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
secret = next(d for d in docs if d["kind"] == "Secret")
open(sys.argv[2], "w").write(secret["stringData"]["edge.toml"])
PY
    # As shipped, the placeholder secret keeps the node from starting...
    if "$tern" edge --config "$tmp/$r.toml" --check >/dev/null 2>"$tmp/err"; then
        say "error: $r's Secret starts with its placeholder token secret"; exit 1
    fi
    grep -q placeholder "$tmp/err" || { say "error: $r: $(cat "$tmp/err")"; exit 1; }
    # ...and with a real one it is a valid configuration.
    sed -i 's/REPLACE-ME-with-64-hex-characters-from-openssl-rand-hex-32/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/' "$tmp/$r.toml"
    "$tern" edge --config "$tmp/$r.toml" --check >/dev/null || { say "error: $r's Secret"; exit 1; }
done

if command -v systemd-analyze >/dev/null 2>&1; then
    say "systemd unit"
    sed "s#/usr/local/bin/tern#$(realpath "$tern")#" deploy/systemd/tern-edge.service > "$tmp/tern-edge.service"
    out="$(systemd-analyze verify "$tmp/tern-edge.service" 2>&1 || true)"
    if [ -n "$out" ]; then say "error: systemd-analyze verify:"; echo "$out" >&2; exit 1; fi
else
    say "systemd-analyze not installed: the unit was not checked"
fi
say "all deployment files valid"

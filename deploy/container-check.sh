#!/usr/bin/env bash
# Builds the container image from the Dockerfile and runs the three-region compose cluster
# (deploy/compose.yaml), then checks it end to end from the host:
#   - every node answers /readyz through its published port, with both peers linked;
#   - a subscriber on us-east (WebSocket, `tern sub`) gets a message published on eu-west
#     (`tern pub`), over the QUIC backbone between the containers;
#   - ap-south's history holds it too, and serves it again after the engine restarted it.
# Then it stops the cluster and removes its containers and volumes.
#
# Usage: deploy/container-check.sh [TERN_BIN]
#   TERN_BIN: the host's tern, for `tern sub`/`tern pub` (default: target/debug/tern).
# Needs podman (tried with Debian 12's podman 4.3.1 and runc) and podman-compose (installed
# into a virtualenv under the target directory from PyPI, pinned). Not run by the test
# command: it builds the release binary inside a container (several minutes on two cores).
#
# Environment:
#   TERN_LOCAL_BASE=1   build the two base images locally (debootstrap of Debian 12 from
#                       deb.debian.org; the build stage gets the host's Rust toolchain and
#                       the host's extra CAs from /usr/local/share/ca-certificates), for
#                       machines that cannot reach docker.io. The image is otherwise the
#                       same Dockerfile.
#   TERN_KEEP=1         leave the cluster running.
#   TERN_SKIP_BUILD=1   use the image tern:dev already built (to rerun the cluster part).
set -euo pipefail
# A relative TERN_BIN is the caller's; resolve it before moving to the repository.
tern_arg="${1:-${TERN_BIN:-}}"
if [ -n "$tern_arg" ] && [ -e "$tern_arg" ]; then tern_arg="$(cd "$(dirname "$tern_arg")" && pwd)/$(basename "$tern_arg")"; fi
cd "$(dirname "$0")/.."
say() { printf 'container-check: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

target="${CARGO_TARGET_DIR:-target}"
tern="${tern_arg:-$target/debug/tern}"
[ -x "$tern" ] || die "$tern not found (cargo build first)"
command -v podman >/dev/null || die "podman not found (Debian: apt-get install podman runc)"

# In a container without systemd and with cgroups v1 (this project's machines), crun refuses
# to run and podman's default ulimits exceed the hard limits: runc, cgroupfs, and ulimits at
# the host's own.
conf="$target/container/containers.conf"
mkdir -p "$target/container"
# (runc could not set nproc at the hard limit itself there; 32768 is plenty.)
nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"
[ "$nofile" = unlimited ] && nofile=1048576
if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
runtime=runc; command -v runc >/dev/null || runtime=crun
cat > "$conf" <<EOF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "${runtime}"
cgroup_manager = "cgroupfs"
EOF
CONTAINERS_CONF="$(cd "$target/container" && pwd)/containers.conf"
export CONTAINERS_CONF

venv="$target/container-venv"
if [ ! -x "$venv/bin/podman-compose" ]; then
    say "installing podman-compose into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check podman-compose==1.6.0
fi
compose() { "$venv/bin/podman-compose" -f deploy/compose.yaml "$@"; }

build_args=()
if [ "${TERN_LOCAL_BASE:-0}" = 1 ]; then
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
    base="$target/container"
    if ! podman image exists localhost/tern-base/debian:bookworm; then
        say "debootstrap: Debian 12 (minbase) for the runtime stage"
        rm -rf "$base/runtime"
        debootstrap --variant=minbase bookworm "$base/runtime" http://deb.debian.org/debian >/dev/null
        tar -C "$base/runtime" -c . | podman import - localhost/tern-base/debian:bookworm >/dev/null
        rm -rf "$base/runtime"
    fi
    if ! podman image exists localhost/tern-base/rust:host; then
        say "debootstrap: Debian 12 with gcc and the host's Rust toolchain for the build stage"
        rm -rf "$base/build"
        debootstrap --variant=minbase --include=ca-certificates,gcc,libc6-dev,make bookworm \
            "$base/build" http://deb.debian.org/debian >/dev/null
        # The host's own extra CAs (a machine behind a TLS-inspecting proxy): cargo in the
        # build stage reaches crates.io as the host does.
        if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
            cp /usr/local/share/ca-certificates/*.crt "$base/build/usr/local/share/ca-certificates/"
            chroot "$base/build" update-ca-certificates >/dev/null
        fi
        sysroot="$(rustc --print sysroot)"
        mkdir -p "$base/build/usr/local/rust"
        cp -a "$sysroot/." "$base/build/usr/local/rust/"
        tar -C "$base/build" -c . | podman import \
            --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            - localhost/tern-base/rust:host >/dev/null
        rm -rf "$base/build"
    fi
    build_args=(--build-arg RUST_IMAGE=localhost/tern-base/rust:host
                --build-arg RUNTIME_IMAGE=localhost/tern-base/debian:bookworm)
fi

if [ "${TERN_SKIP_BUILD:-0}" = 1 ] && podman image exists tern:dev; then
    say "TERN_SKIP_BUILD=1: using the image tern:dev as it is"
else
    say "building the image tern:dev (podman build; the release build takes minutes)"
    podman build --quiet --ulimit "nofile=${nofile}:${nofile}" --ulimit "nproc=${nproc}:${nproc}" \
        "${build_args[@]}" -t tern:dev . >/dev/null
fi

cleanup() {
    if [ "${TERN_KEEP:-0}" != 1 ]; then
        say "stopping the cluster"
        compose down --volumes >/dev/null 2>&1 || true
    fi
    [ -n "${sub_pid:-}" ] && kill "$sub_pid" 2>/dev/null || true
}
trap cleanup EXIT
compose down --volumes >/dev/null 2>&1 || true
# The certificates step first, then the nodes without their dependency link: podman (4.3)
# will not restart a container whose dependency has exited, which the certs step has by
# design. (`docker compose up` runs the file as it is.)
say "making the certificates (the certs step)"
compose up --detach --no-build certs >/dev/null
certs_exit="$(podman wait tern_certs_1)" || die "podman wait for the certs step failed"
[ "$certs_exit" = 0 ] || { compose logs certs >&2; die "the certs step failed (exit $certs_exit)"; }
say "starting three regions (podman-compose up)"
compose up --detach --no-build --no-deps eu-west us-east ap-south >/dev/null

ready() {
    local port="$1"
    for _ in $(seq 1 120); do
        body="$(curl -fsS "http://127.0.0.1:$port/readyz" 2>/dev/null || true)"
        # Ready, and both peers linked (a ready node may have no reachable peer).
        if [ -n "$body" ] && [ "$(grep -o '"linked":true' <<<"$body" | wc -l)" -eq 2 ]; then
            return 0
        fi
        sleep 1
    done
    say "port $port not ready with both peers linked: ${body:-no answer}"
    compose logs >&2 || true
    return 1
}
for port in 7400 7410 7420; do ready "$port"; done
say "every region ready, each linked to both others"

channel="chat:container-check-$$"
out="$target/container/sub.out"
err="$target/container/sub.err"
"$tern" sub --count 1 ws://127.0.0.1:7410 "$channel" > "$out" 2>"$err" &
sub_pid=$!
for _ in $(seq 1 100); do grep -q 'subscribed to' "$err" && break; sleep 0.1; done
grep -q 'subscribed to' "$err" || die "tern sub did not subscribe on us-east: $(cat "$err")"
"$tern" pub ws://127.0.0.1:7400 "$channel" "hello from eu-west" >/dev/null
for _ in $(seq 1 100); do grep -q 'hello from eu-west' "$out" && break; sleep 0.1; done
grep -q 'hello from eu-west' "$out" || die "the us-east subscriber did not get the eu-west publish"
grep -q '"eu-west/edge-1"' "$out" || die "origin not eu-west: $(cat "$out")"
say "eu-west -> us-east: delivered over the backbone"

# (The bodies are read whole before grep: with pipefail, grep -q closing the pipe early
# would fail the pipeline.)
holds() { local b; b="$(curl -fsS "http://127.0.0.1:$1/v1/channels/$channel/messages" || true)"; grep -q 'hello from eu-west' <<<"$b"; }
for _ in $(seq 1 50); do holds 7420 && break; sleep 0.1; done
holds 7420 || die "ap-south's history lacks the message"
say "ap-south's history holds it"

say "restarting ap-south (its log is on a volume)"
podman restart tern_ap-south_1 >/dev/null
ready 7420
for _ in $(seq 1 50); do holds 7420 && break; sleep 0.1; done
holds 7420 || die "ap-south lost its history across a restart"
say "ok: image built, three regions linked, cross-region pub/sub and history across a restart"

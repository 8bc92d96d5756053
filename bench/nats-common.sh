# Shared by the NATS comparison scripts: install Debian's nats-server when it is missing
# (needs root or sudo), and build Tern in release mode.
if ! command -v nats-server >/dev/null 2>&1; then
  echo "installing nats-server (Debian package)…" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq nats-server >/dev/null
fi
cargo build --release --quiet

#!/usr/bin/env bash
# `make bench`: installs what eps is compared with (once), builds everything in release and runs
# every scenario against every system. Arguments go to eps-bench (e.g. --quick, --systems).
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=bench/.peers
# rathole 0.5.0's own lock file pins a `time` that no longer compiles with current Rust, so it is
# resolved afresh (no --locked); only its server and client are built (no TLS, noise or
# websocket transports: the benchmark uses plain TCP, and no OpenSSL is needed).
RATHOLE_VERSION=0.5.0

say() { echo "==> $*"; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  sudo_ apt-get install -y -q "$@" >/dev/null ||
    { sudo_ apt-get update -q >/dev/null && sudo_ apt-get install -y -q "$@" >/dev/null; }
}

if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
  say "installing haproxy (apt-get install haproxy)"
  apt_install haproxy
fi
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && [ -z "${BENCH_FONT:-}" ]; then
  say "installing the plot's font (apt-get install fonts-dejavu-core)"
  apt_install fonts-dejavu-core
fi
if [ ! -x "$PEERS/bin/rathole" ]; then
  say "installing rathole $RATHOLE_VERSION into $PEERS (once; a few minutes)"
  cargo install --quiet rathole --version "$RATHOLE_VERSION" \
    --no-default-features --features server,client --root "$PEERS"
fi

say "building eps, proxy, internal-server and eps-bench (release)"
cargo build --release --locked --quiet -p eps -p proxy -p internal-server -p eps-bench
say "running the benchmarks"
exec cargo run --release --locked --quiet -p eps-bench -- "$@"

#!/usr/bin/env bash
# The five-process demo in one terminal: internal server, public and private proxy, and their
# two EPS servers. Each log line is prefixed with its process. Ctrl-C stops all five.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building (release)"
cargo build --release --locked --quiet --bins
BIN=target/release
[ -f settings/dev/certs/root.crt ] || "$BIN/eps" certs

for port in 8888 4433 9999 6655 8877 5544 5556 7766; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port on 127.0.0.1 is already in use: stop what holds it (another demo?) and retry" >&2
    exit 1
  fi
done

pids=()
start() { # name, then the command with its environment
  local name=$1; shift
  ( exec env "$@" 2>&1 | sed -u "s/^/[$name] /" ) &
  pids+=($!)
}
stop() {
  trap - INT TERM EXIT
  echo
  echo "==> stopping"
  # The processes first, then the subshells around them: a subshell killed first leaves its
  # process to init, out of reach (as when the script itself, not the terminal, gets the signal).
  for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; done
  pkill -TERM -P "$$" 2>/dev/null || true
  wait 2>/dev/null || true
  echo "==> stopped"
}
trap stop INT TERM EXIT

start internal-server         "$BIN/internal-server"
start public-proxy            PROXY_SETTINGS=settings/dev/roles/public-proxy-1 "$BIN/proxy" run public
start private-proxy           PROXY_SETTINGS=settings/dev/roles/private-proxy-1 "$BIN/proxy" run private
start public-proxy-eps        EPS_SETTINGS=settings/dev/roles/public-proxy-eps-1 "$BIN/eps" server run
start private-proxy-eps       EPS_SETTINGS=settings/dev/roles/private-proxy-eps-1 "$BIN/eps" server run

CURL=(curl -sS --max-time 5 --cacert settings/dev/certs/root.crt
      --resolve test.internal-server.local:4433:127.0.0.1
      https://test.internal-server.local:4433/jsonrpc)
echo "==> waiting for a request through the tunnel to succeed"
answer=""
for _ in $(seq 1 120); do
  if answer=$("${CURL[@]}" 2>/dev/null) && [ -n "$answer" ]; then break; fi
  answer=""
  sleep 0.5
done
if [ -z "$answer" ]; then
  echo "==> no answer through the tunnel after 60 s; see the logs above" >&2
  exit 1
fi
cat <<MSG

==> the tunnel works. Answer of the internal server, through both proxies:
    $answer

    Send more from another terminal:
      ${CURL[*]}
      ${CURL[*]} --data '{}'

    Ctrl-C stops all five processes.
MSG
wait

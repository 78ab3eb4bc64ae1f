#!/usr/bin/env bash
# CI's end-to-end check of `wskeep bench`: a short run of each scenario through wskeep (TLS off)
# in front of `wskeep bench echo`. Figures are not checked here; README's come from longer runs.
set -euo pipefail
bin=${1:-target/release/wskeep}
source "$(dirname "$0")/lib.sh"
up=$(free_port); port=$(free_port); admin=$(free_port)

# start_wskeep NAME PORT ADMIN UPSTREAM_PORT: wskeep in front of the upstream, ready when it returns.
start_wskeep() {
  cat >"$dir/$1.toml" <<TOML
[listen]
addr = "127.0.0.1:$2"
[admin]
addr = "127.0.0.1:$3"
[upstream]
url = "ws://127.0.0.1:$4"
[client_keepalive]
ping_interval = "1s"
timeout = "5s"
[log]
level = "warn"
TOML
  "$bin" run --config "$dir/$1.toml" >"$dir/$1.log" 2>&1 & pids+=($!)
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$3/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$3/readyz" >/dev/null
}

"$bin" bench echo --listen "127.0.0.1:$up" >"$dir/echo.log" 2>&1 & pids+=($!)
start_wskeep wskeep "$port" "$admin" "$up"

url="ws://127.0.0.1:$port/"
"$bin" bench throughput "$url" --conns 4 --size 64 --window 8 --duration 1s | tail -1 | grep -q '"messages_per_second"'
"$bin" bench latency "$url" --conns 4 --rate 200 --duration 1s | tail -1 | grep -q '"p99_us"'
"$bin" bench idle "$url" --conns 50 --hold 2s | tail -1 | tee "$dir/idle.json" | grep -q '"lost":0'

# Compressed messages, through wskeep to an echo that agrees to permessage-deflate.
python_ws=${XDG_CACHE_HOME:-$HOME/.cache}/wskeep/websockets-venv/bin/python
cup=$(free_port); cport=$(free_port); cadmin=$(free_port)
"$python_ws" tests/compression/peers.py upstream "$cup" >"$dir/compressing-echo.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do grep -q ready "$dir/compressing-echo.log" 2>/dev/null && break; sleep 0.1; done
start_wskeep compressed "$cport" "$cadmin" "$cup"
"$bin" bench throughput "ws://127.0.0.1:$cport/" --conns 4 --size 64 --window 8 --duration 1s --compressed \
  | tail -1 | grep -q '"messages_per_second"'
curl -fs "http://127.0.0.1:$cadmin/metrics" | grep -q '^wskeep_compressed_connections_total 4'
echo "bench smoke: all scenarios ran"

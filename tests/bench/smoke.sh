#!/usr/bin/env bash
# CI's end-to-end check of `wskeep bench`: a short run of each scenario through wskeep (TLS off)
# in front of `wskeep bench echo`. Figures are not checked here; README's come from longer runs.
set -euo pipefail
bin=${1:-target/release/wskeep}
source "$(dirname "$0")/lib.sh"
up=$(free_port); port=$(free_port); admin=$(free_port)

"$bin" bench echo --listen "127.0.0.1:$up" >"$dir/echo.log" 2>&1 & pids+=($!)
cat >"$dir/wskeep.toml" <<TOML
[listen]
addr = "127.0.0.1:$port"
[admin]
addr = "127.0.0.1:$admin"
[upstream]
url = "ws://127.0.0.1:$up"
[client_keepalive]
ping_interval = "1s"
timeout = "5s"
[log]
level = "warn"
TOML
"$bin" run --config "$dir/wskeep.toml" >"$dir/wskeep.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null

url="ws://127.0.0.1:$port/"
"$bin" bench throughput "$url" --conns 4 --size 64 --window 8 --duration 1s | tail -1 | grep -q '"messages_per_second"'
"$bin" bench latency "$url" --conns 4 --rate 200 --duration 1s | tail -1 | grep -q '"p99_us"'
"$bin" bench idle "$url" --conns 50 --hold 2s | tail -1 | tee "$dir/idle.json" | grep -q '"lost":0'
echo "bench smoke: all scenarios ran"

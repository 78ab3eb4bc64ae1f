#!/usr/bin/env bash
# Keepalive at scale: N idle connections through wskeep with 1 s protocol pings on both legs.
# Reports wskeep's CPU (from /proc/PID/stat) over a window in the middle of the hold, its resident
# memory, and connections lost. Not a CI test: figures go into README.
#   tests/bench/keepalive_scale.sh [BIN] [CONNS] [HOLD_SECONDS]
set -euo pipefail
bin=${1:-target/release/wskeep}; conns=${2:-9500}; hold=${3:-60}
source "$(dirname "$0")/lib.sh"
up=$(free_port); port=$(free_port); admin=$(free_port)
ulimit -n "$(ulimit -Hn)"
"$bin" bench echo --listen "127.0.0.1:$up" >"$dir/echo.log" 2>&1 & pids+=($!)
cat >"$dir/wskeep.toml" <<TOML
[listen]
addr = "127.0.0.1:$port"
max_connections = 9900
[admin]
addr = "127.0.0.1:$admin"
[upstream]
url = "ws://127.0.0.1:$up"
[client_keepalive]
ping_interval = "1s"
timeout = "5s"
[upstream_keepalive]
ping_interval = "1s"
timeout = "5s"
[log]
level = "warn"
TOML
"$bin" run --config "$dir/wskeep.toml" >"$dir/wskeep.log" 2>&1 & wpid=$!; pids+=($wpid)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
"$bin" bench idle "ws://127.0.0.1:$port/" --conns "$conns" --hold "${hold}s" --parallel 128 >"$dir/bench.log" 2>&1 & bpid=$!; pids+=($bpid)
# Wait until every connection is up, then measure CPU over the middle of the hold.
for _ in $(seq 600); do
  active=$(curl -fs "http://127.0.0.1:$admin/metrics" | awk '/^wskeep_connections_active /{print $2}')
  [[ "${active:-0}" -ge "$conns" ]] && break; sleep 0.2
done
ticks() { awk '{print $14+$15}' "/proc/$wpid/stat"; }
hz=$(getconf CLK_TCK); window=$((hold / 2))
t0=$(ticks); sleep "$window"; t1=$(ticks)
rss_kb=$(awk '/VmRSS/{print $2}' "/proc/$wpid/status")
wait "$bpid" || true
cpu=$(python3 -c "print(f'{($t1-$t0)/$hz/$window*100:.1f}')")
pings=$(curl -fs "http://127.0.0.1:$admin/metrics" | awk '/^wskeep_pings_sent_total/{s+=$2} END{print s}')
echo "connections $active; wskeep CPU ${cpu}% of one core over ${window}s; RSS $((rss_kb/1024)) MiB ($((rss_kb*1024/conns)) B per connection); pings sent $pings"
tail -3 "$dir/bench.log"

#!/usr/bin/env bash
# What lossless reconnect ([resume], docs/resume.md) costs: wskeep's resident memory per idle
# connection (ordinary, resumable and attached, resumable and detached) and its CPU per echoed
# 64 B message (ordinary, resumable: counting, keeping every message until the client's ack).
# Not a CI test: it produces the figures of docs/performance.md. Plain ws:// on loopback, wskeep
# on CPU 1 (one worker thread), `wskeep bench` and its echo upstream on CPU 0.
#
#   tests/bench/resume.sh [BIN]
#
# Environment: CONNS [2000] idle connections per run; ROUNDS [2]; DURATION [10s] throughput runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:-target/release/wskeep}")
CONNS=${CONNS:-2000}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10s}
out=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$out"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss() { awk '/^VmRSS/ {print $2 * 1024}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
metric() { curl -s "http://127.0.0.1:$admin/metrics" | awk -v s="$1" '$1 == s {print $2}'; }

echo_port=$(free_port)
taskset -c 0 "$bin" bench echo --listen "127.0.0.1:$echo_port" >/dev/null 2>&1 & pids+=($!)

# start_wskeep: a fresh wskeep (no memory inherited from the previous run); sets $pid, $port, $admin.
start_wskeep() {
  port=$(free_port); admin=$(free_port)
  cat >"$out/wskeep.toml" <<EOF
[listen]
addr = "127.0.0.1:$port"
[admin]
addr = "127.0.0.1:$admin"
[upstream]
url = "ws://127.0.0.1:$echo_port"
[resume]
enabled = true
grace = "5m"
[log]
level = "warn"
EOF
  taskset -c 1 "$bin" run --config "$out/wskeep.toml" 2>>"$out/wskeep.log" & pid=$!; pids+=("$pid")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && return; sleep 0.1; done
  echo "wskeep did not start" >&2; exit 1
}
stop_wskeep() { kill "$pid"; wait "$pid" 2>/dev/null || true; }

# idle MODE: RSS per connection, held by wskeep after CONNS connections opened (and dropped).
idle() {
  local mode=$1 query="" drop="" series=wskeep_connections_active
  [[ $mode != ordinary ]] && query="?wskeep_resume=1"
  [[ $mode == detached ]] && drop=--drop && series=wskeep_resume_sessions_detached
  start_wskeep
  local before; before=$(rss "$pid")
  taskset -c 0 "$bin" bench idle "ws://127.0.0.1:$port/$query" --conns "$CONNS" --hold 60s --parallel 64 $drop \
    >"$out/idle.log" 2>&1 & local bench=$!
  for _ in $(seq 600); do [[ $(metric $series) == "$CONNS" ]] && break; sleep 0.1; done
  [[ $(metric $series) == "$CONNS" ]] || { echo "$mode: $series never reached $CONNS" >&2; cat "$out/idle.log" >&2; exit 1; }
  sleep 2
  local after; after=$(rss "$pid")
  kill "$bench" 2>/dev/null || true; wait "$bench" 2>/dev/null || true
  stop_wskeep
  echo $(( (after - before) / CONNS ))
}

# throughput MODE: wskeep's CPU per echoed 64 B message (50 connections, window 16).
throughput() {
  local query=""; [[ $1 == resumable ]] && query="?wskeep_resume=1"
  start_wskeep
  local hz; hz=$(getconf CLK_TCK)
  local t0; t0=$(cpu_ticks "$pid")
  taskset -c 0 "$bin" bench throughput "ws://127.0.0.1:$port/$query" --conns 50 --size 64 --window 16 \
    --duration "$DURATION" >"$out/tp.log" 2>&1
  local t1; t1=$(cpu_ticks "$pid")
  local n; n=$(tail -n 1 "$out/tp.log" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
  stop_wskeep
  python3 -c "print(f'{($t1 - $t0) / $hz / $n * 1e6:.2f}')"
}

printf 'round\tordinary B\tresumable attached B\tresumable detached B\tordinary µs/msg\tresumable µs/msg\n'
for r in $(seq "$ROUNDS"); do
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$(idle ordinary)" "$(idle attached)" "$(idle detached)" \
    "$(throughput ordinary)" "$(throughput resumable)"
done

#!/usr/bin/env bash
# wskeep against nginx and HAProxy, all terminating TLS in front of the same echo upstream, plus a
# direct run (load generator straight to the echo upstream over plain ws://, no TLS: the floor).
# Not a CI test: it produces the README's comparison table. Needs nginx, haproxy, openssl,
# python3, taskset and curl on PATH (Debian: apt-get install nginx haproxy); installs nothing.
#
#   tests/bench/compare.sh [BIN]
#
# Environment (defaults in brackets):
#   ROUNDS [3]          rounds; round r runs the proxies in PROXIES rotated by r, medians are reported
#   DURATION [10s]      length of scenarios 1-3
#   SCENARIOS [1 2 3 4 5 6 7]
#                       1: 64 B text, 50 connections, window 16          (messages/s, proxy CPU per message)
#                       2: 16 KiB binary, 20 connections, window 4       (messages/s, proxy CPU per message)
#                       3: latency, 2,000 messages/s over 100 connections (p50, p99, proxy CPU)
#                       4: IDLE_CONNS idle TLS connections held IDLE_HOLD (handshakes/s, proxy RSS per connection)
#                       5: wskeep: IDLE_CONNS idle TLS connections, 1 s pings on both legs, KEEPALIVE_HOLD
#                          (wskeep CPU over the middle half of the hold, connections lost); as
#                          tests/bench/keepalive_scale.sh but over TLS, client timeout 30 s.
#                          Its direct run is the kernel floor, tests/bench/floor.c (built with cc):
#                          the same writes and reads on as many loopback sockets, nothing else
#                          (nginx and HAProxy have no keepalive of their own: not run)
#                       6: as 1, compressed: permessage-deflate agreed end to end with a Python
#                          `websockets` echo upstream (tests/compression/peers.py, from
#                          tests/networks/install.sh's venv), every message sent with RSV1
#                          (msg/s is the Python echo's; proxy CPU per message is the figure)
#                       7: wskeep: lossless reconnect (tests/bench/resume.sh, one round, plain ws://):
#                          RSS per idle connection, ordinary / resumable attached / resumable
#                          detached, and CPU per echoed 64 B message, ordinary / resumable
#   PROXIES [direct nginx haproxy wskeep]
#                       also wskeep-wss: wskeep with a wss:// upstream (a second wskeep terminating
#                       TLS in front of the echo upstream, on CPU 0), for the cost of a TLS upstream leg;
#                       and wskeep-h2: wskeep with every WebSocket a stream of an HTTP/2 connection
#                       (RFC 8441, `bench --http2 100`: 100 streams per TLS connection, as many
#                       as wskeep's default listen.http2_max_streams), for the cost of the h2 path
#   IDLE_CONNS [9500]   a process may hold 20,000 descriptors here and a proxy needs two per
#                       connection plus its listener, log and epoll descriptors: 10,000 does not fit
#   IDLE_HOLD [20s]     hold of scenario 4
#   IDLE_PARALLEL [128] handshakes in flight at once in scenarios 4 and 5
#   KEEPALIVE_HOLD [60] seconds, hold of scenario 5
#   STATUS_PAGE [0]     seconds between /status.json requests on wskeep's admin port during scenario
#                       5's measured window, as an open status page makes them (0: none); the
#                       responses' sizes and times are in OUT/*.status
#   OUT [target/bench-compare-DATE]   raw logs and results.tsv, table.txt (kept)
#
# CPU placement: every proxy runs on CPU 1 (taskset -c 1; nginx worker_processes 1, HAProxy
# nbthread 1, wskeep's runtime sizes itself to its affinity: one worker thread). The load
# generator and the echo upstream share CPU 0 (taskset -c 0). Proxy CPU time is utime+stime from
# /proc/PID/stat (nginx: master plus worker) read right before and right after the bench command.
# A fresh echo upstream and a fresh proxy are started for every scenario run, so memory figures do
# not inherit the previous scenario's buffers.
# shellcheck disable=SC2046 # $(tls) and pgrep lists are split on purpose
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:-target/release/wskeep}")
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
SCENARIOS=${SCENARIOS:-1 2 3 4 5 6 7}
PROXIES=${PROXIES:-direct nginx haproxy wskeep}
IDLE_CONNS=${IDLE_CONNS:-9500}
IDLE_HOLD=${IDLE_HOLD:-20s}
IDLE_PARALLEL=${IDLE_PARALLEL:-128}
KEEPALIVE_HOLD=${KEEPALIVE_HOLD:-60}
STATUS_PAGE=${STATUS_PAGE:-0}
OUT=${OUT:-target/bench-compare-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"; OUT=$(realpath "$OUT")

# Scenario 5's direct run is the kernel floor, a C program built here.
need_floor=; [[ " $SCENARIOS " == *" 5 "* && " $PROXIES " == *" direct "* ]] && need_floor=1
tools="openssl python3 taskset curl timeout${need_floor:+ cc}"
for tool in $tools; do
  command -v "$tool" >/dev/null || { echo "compare.sh: $tool not found" >&2; exit 1; }
done
for p in $PROXIES; do
  case $p in
    direct|wskeep|wskeep-wss|wskeep-h2) ;;
    nginx|haproxy) command -v "$p" >/dev/null || { echo "compare.sh: $p not found (apt-get install nginx haproxy)" >&2; exit 1; } ;;
    *) echo "compare.sh: unknown proxy $p" >&2; exit 1 ;;
  esac
done
[[ -x "$bin" ]] || { echo "compare.sh: $bin not found (cargo build --release --locked)" >&2; exit 1; }
python_ws=${XDG_CACHE_HOME:-$HOME/.cache}/wskeep/websockets-venv/bin/python
if [[ " $SCENARIOS " == *" 6 "* && ! -x $python_ws ]]; then
  echo "compare.sh: scenario 6 needs $python_ws (tests/networks/install.sh)" >&2; exit 1
fi
[[ $(nproc) -ge 2 ]] || { echo "compare.sh: needs two CPUs (proxy on 1, load on 0)" >&2; exit 1; }

ulimit -n "$(ulimit -Hn)"
nofile=$(ulimit -n)
hz=$(getconf CLK_TCK)
secs() { python3 -c "import sys,re; m=re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m)?', sys.argv[1]); v=float(m[1]); print(int(v/1000 if m[2]=='ms' else v*60 if m[2]=='m' else v))" "$1"; }
dur_s=$(secs "$DURATION"); idle_hold_s=$(secs "$IDLE_HOLD")

source tests/bench/lib.sh

log() { echo "[$(date +%T)] $*" >&2; }

# Stops one process we started (and, for nginx, its worker): TERM, up to 10 s, then KILL.
stop() {
  local pid=$1 kids p
  kids=$(pgrep -P "$pid" 2>/dev/null || true)
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
  for p in $kids; do kill -KILL "$p" 2>/dev/null || true; forget "$p"; done
}

wait_tcp() { # port: bounded wait (10 s) until something accepts on 127.0.0.1:port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# Certificate: ECDSA P-256, self-signed, for 127.0.0.1 and localhost.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
cat "$dir/cert.pem" "$dir/key.pem" >"$dir/combined.pem"

echo_pid=; proxy_pid=; proxy_port=; admin_port=; tls_echo_pid=
# start_echo [compressing]: `wskeep bench echo`, or the Python echo that agrees to permessage-deflate.
start_echo() {
  echo_port=$(free_port)
  if [[ -n ${1:-} ]]; then
    taskset -c 0 "$python_ws" tests/compression/peers.py upstream "$echo_port" >>"$OUT/echo.log" 2>&1 & echo_pid=$!
  else
    taskset -c 0 "$bin" bench echo --listen "127.0.0.1:$echo_port" >>"$OUT/echo.log" 2>&1 & echo_pid=$!
  fi
  pids+=("$echo_pid")
  wait_tcp "$echo_port" || { echo "echo upstream did not start" >&2; exit 1; }
}

# start_proxy NAME [keepalive]: starts NAME on CPU 1 with TLS in front of the echo upstream.
start_proxy() {
  local name=$1 keepalive=${2:-} run=$dir/$1
  proxy_port=$(free_port); mkdir -p "$run"
  case $name in
    direct) proxy_pid=; return 0 ;;
    nginx)
      mkdir -p "$run/tmp"
      # nginx closes connections still waiting for a request (those in the TLS handshake) once
      # fewer than 1/16 of worker_connections are free, so it needs 2 x 16/15 per connection;
      # worker_connections may exceed the descriptor limit (nginx warns), the descriptors used
      # stay at 2 per connection.
      local nginx_conns=$(( IDLE_CONNS * 2 * 16 / 15 + 100 ))
      (( nginx_conns > nofile - 16 )) || nginx_conns=$(( nofile - 16 ))
      cat >"$run/nginx.conf" <<CONF
$( [[ $(id -u) -eq 0 ]] && echo 'user root;' )
worker_processes 1;
worker_rlimit_nofile $nofile;
pid $run/nginx.pid;
error_log $OUT/nginx-error.log warn;
events { worker_connections $nginx_conns; }
http {
  access_log off;
  client_body_temp_path $run/tmp/body; proxy_temp_path $run/tmp/proxy; fastcgi_temp_path $run/tmp/fastcgi;
  uwsgi_temp_path $run/tmp/uwsgi; scgi_temp_path $run/tmp/scgi;
  server {
    listen 127.0.0.1:$proxy_port ssl;
    ssl_protocols TLSv1.3;
    ssl_certificate $dir/cert.pem;
    ssl_certificate_key $dir/key.pem;
    location / {
      proxy_pass http://127.0.0.1:$echo_port;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }
  }
}
CONF
      taskset -c 1 nginx -p "$run" -e "$OUT/nginx-error.log" -c "$run/nginx.conf" -g 'daemon off;' >>"$OUT/nginx.log" 2>&1 &
      proxy_pid=$!; pids+=("$proxy_pid")
      wait_tcp "$proxy_port" || { echo "nginx did not start:" >&2; tail -20 "$OUT/nginx-error.log" >&2; exit 1; }
      # The master listens before it forks the worker: wait for the worker too.
      local p=
      for _ in $(seq 100); do p=$(pgrep -P "$proxy_pid" | head -1 || true); [[ -n $p ]] && break; sleep 0.1; done
      [[ -n $p ]] || { echo "nginx started no worker" >&2; exit 1; }
      pids+=("$p")
      ;;
    haproxy)
      cat >"$run/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn $(( (nofile - 100) / 2 ))
  ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
  mode http
  maxconn $(( (nofile - 100) / 2 ))
  timeout connect 5s
  timeout http-request 10s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:$proxy_port ssl crt $dir/combined.pem alpn http/1.1
  default_backend be
backend be
  server echo 127.0.0.1:$echo_port
CONF
      taskset -c 1 haproxy -f "$run/haproxy.cfg" -db >>"$OUT/haproxy.log" 2>&1 &
      proxy_pid=$!; pids+=("$proxy_pid")
      wait_tcp "$proxy_port" || { echo "haproxy did not start:" >&2; tail -20 "$OUT/haproxy.log" >&2; exit 1; }
      ;;
    wskeep|wskeep-wss|wskeep-h2)
      admin_port=$(free_port)
      local ping=0s ctimeout=3600s utimeout=0s upstream_url="ws://127.0.0.1:$echo_port" upstream_tls=
      if [[ $name == wskeep-wss ]]; then
        # The upstream leg over TLS: a second wskeep terminates TLS in front of the echo upstream,
        # on the load's CPU, so the measured wskeep's figures are those of a wss:// upstream.
        local tls_echo_port tls_admin_port; tls_echo_port=$(free_port); tls_admin_port=$(free_port)
        # Not a CA (openssl's default), or rustls refuses it as the upstream's own certificate.
        [[ -f $dir/upstream-cert.pem ]] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
          -nodes -days 2 -subj /CN=localhost -addext basicConstraints=critical,CA:FALSE \
          -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
          -keyout "$dir/upstream-key.pem" -out "$dir/upstream-cert.pem" 2>/dev/null
        cat >"$run/tls-echo.toml" <<TOML
[listen]
addr = "127.0.0.1:$tls_echo_port"
tls_cert = "$dir/upstream-cert.pem"
tls_key = "$dir/upstream-key.pem"
max_connections = $(( IDLE_CONNS + 200 ))
[admin]
addr = "127.0.0.1:$tls_admin_port"
[upstream]
url = "ws://127.0.0.1:$echo_port"
[client_keepalive]
ping_interval = "0s"
timeout = "0s"
[log]
level = "warn"
TOML
        taskset -c 0 "$bin" run --config "$run/tls-echo.toml" >>"$OUT/wskeep-tls-echo.log" 2>&1 &
        tls_echo_pid=$!; pids+=("$tls_echo_pid")
        for _ in $(seq 100); do curl -fs "http://127.0.0.1:$tls_admin_port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
        upstream_url="wss://127.0.0.1:$tls_echo_port"; upstream_tls="ca_file = \"$dir/upstream-cert.pem\""
      fi
      # `bench idle` answers pings only once every connection is open (9,500 TLS handshakes can
      # take longer than 5 s), so the client timeout is 30 s; the upstream answers at once.
      [[ -n $keepalive ]] && { ping=1s; ctimeout=30s; utimeout=5s; }
      cat >"$run/wskeep.toml" <<TOML
[listen]
addr = "127.0.0.1:$proxy_port"
tls_cert = "$dir/cert.pem"
tls_key = "$dir/key.pem"
max_connections = $(( IDLE_CONNS + 200 ))
[admin]
addr = "127.0.0.1:$admin_port"
[upstream]
url = "$upstream_url"
$upstream_tls
[client_keepalive]
ping_interval = "$ping"
timeout = "$ctimeout"
[upstream_keepalive]
ping_interval = "$ping"
timeout = "$utimeout"
[shutdown]
drain_timeout = "1s"
[log]
level = "warn"
TOML
      taskset -c 1 "$bin" run --config "$run/wskeep.toml" >>"$OUT/wskeep.log" 2>&1 &
      proxy_pid=$!; pids+=("$proxy_pid")
      local ok=
      for _ in $(seq 100); do curl -fs "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && { ok=1; break; }; sleep 0.1; done
      [[ -n $ok ]] || { echo "wskeep did not become ready:" >&2; tail -20 "$OUT/wskeep.log" >&2; exit 1; }
      ;;
  esac
}

stop_all() {
  [[ -n $proxy_pid ]] && stop "$proxy_pid"
  [[ -n $tls_echo_pid ]] && stop "$tls_echo_pid"
  [[ -n $echo_pid ]] && stop "$echo_pid"
  proxy_pid=; echo_pid=; tls_echo_pid=
}

# The proxy's processes: the one we started plus its children (nginx's worker).
proxy_procs() { echo "$proxy_pid" $(pgrep -P "$proxy_pid" 2>/dev/null || true); }
ticks() { local t=0 p; for p in $(proxy_procs); do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
rss_kb() { local r=0 p; for p in $(proxy_procs); do r=$((r + $(awk '/^VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done; echo "$r"; }
# The RSS that holds connections: nginx's worker (the master holds none), else the process.
conn_rss_kb() {
  local p=$proxy_pid
  [[ $current == nginx ]] && p=$(pgrep -P "$proxy_pid" | head -1)
  awk '/^VmRSS/{print $2}' "/proc/$p/status"
}

result() { printf '%s\t%s\t%s\t%s\n' "$round" "$current" "$1" "$2" >>"$OUT/results.tsv"; }
jget() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
url() {
  if [[ $current == direct ]]; then echo "ws://127.0.0.1:$echo_port/"; else echo "wss://127.0.0.1:$proxy_port/"; fi
}
tls() { [[ $current == direct ]] || echo --insecure; [[ $current == wskeep-h2 ]] && echo --http2 100; true; }

# finish_idle PID HOLD_SECONDS: waits for a `bench idle` run (KILL two minutes past its hold),
# then sets `json` to its JSON line; fails, with its log's tail, if it did not succeed. Not in a
# subshell: `wait` needs the PID to be this shell's child.
finish_idle() {
  local bpid=$1 hold=$2 ok= rc=0
  for _ in $(seq $(( (hold + 120) * 10 ))); do kill -0 "$bpid" 2>/dev/null || { ok=1; break; }; sleep 0.1; done
  [[ -n $ok ]] || { kill -KILL "$bpid" 2>/dev/null || true; echo "bench idle did not finish" >&2; }
  wait "$bpid" || rc=$?; forget "$bpid"
  (( rc == 0 )) || { echo "bench idle failed ($tag):" >&2; tail -5 "$OUT/$tag.log" >&2; return 1; }
  json=$(tail -1 "$OUT/$tag.log")
}

# bench_cpu LOGNAME TIMEOUT ARGS...: runs the load generator on CPU 0, proxy ticks around it.
bench_cpu() {
  local name=$1 limit=$2; shift 2
  local t0=0 t1=0 start end
  [[ -n $proxy_pid ]] && t0=$(ticks)
  start=$(date +%s.%N)
  timeout "$limit" taskset -c 0 "$bin" bench "$@" >"$OUT/$name.log" 2>&1 || { echo "bench failed ($name):" >&2; tail -5 "$OUT/$name.log" >&2; return 1; }
  end=$(date +%s.%N)
  [[ -n $proxy_pid ]] && t1=$(ticks)
  json=$(tail -1 "$OUT/$name.log")
  cpu_ticks=$((t1 - t0)); wall=$(python3 -c "print($end-$start)")
}

# Scenario 5's floor: a ping and a pong a second on each of 2 x IDLE_CONNS loopback sockets, with
# no TLS, WebSocket or timers: what the system calls alone cost here.
floor_s5() {
  local port ppid json
  port=$(free_port)
  taskset -c 0 "$floor" peer "$port" >"$OUT/$tag.peer.log" 2>&1 & ppid=$!; pids+=("$ppid")
  wait_tcp "$port" || { echo "floor peer did not start" >&2; stop "$ppid"; return 0; }
  if json=$(timeout $((KEEPALIVE_HOLD + 60)) taskset -c 1 "$floor" pinger "$port" $((IDLE_CONNS * 2)) $((KEEPALIVE_HOLD / 2)) 2>"$OUT/$tag.log"); then
    echo "$json" >>"$OUT/$tag.log"
    # A floor that did less than the whole load would read as a lower floor.
    local writes reads
    writes=$(jget "$json" writes_per_s); reads=$(jget "$json" reads_per_s)
    if (( writes * 100 >= IDLE_CONNS * 2 * 99 && reads * 100 >= IDLE_CONNS * 2 * 99 )); then
      result s5.cpu_pct "$(jget "$json" cpu_pct)"
    else
      echo "floor: $writes writes/s and $reads reads/s, short of $((IDLE_CONNS * 2)); no figure" >&2
    fi
  else
    echo "floor pinger failed:" >&2; tail -5 "$OUT/$tag.log" >&2
  fi
  stop "$ppid"
}

scenario() {
  local s=$1 tag="r${round}-${current}-s$1"
  log "round $round: $current, scenario $s"
  if [[ $s == 5 && $current == direct ]]; then floor_s5; return 0; fi
  if [[ $s == 7 ]]; then
    # Its own processes and placement (wskeep on CPU 1, load on CPU 0), one round.
    ROUNDS=1 CONNS=2000 DURATION="$DURATION" bash tests/bench/resume.sh "$bin" >"$OUT/$tag.log" 2>&1 \
      || { echo "resume.sh failed:" >&2; tail -5 "$OUT/$tag.log" >&2; return 0; }
    local line; line=$(tail -1 "$OUT/$tag.log")
    local keys=(s7.ordinary_b s7.attached_b s7.detached_b s7.ordinary_us s7.resumable_us) i
    read -r -a fields <<<"$line"
    for i in 0 1 2 3 4; do result "${keys[$i]}" "${fields[$((i + 1))]}"; done
    return 0
  fi
  start_echo "$([[ $s == 6 ]] && echo compressing)"
  start_proxy "$current" "$([[ $s == 5 ]] && echo keepalive)"
  case $s in
    1|2|6)
      if [[ $s == 1 ]]; then
        bench_cpu "$tag" $((dur_s + 120)) throughput "$(url)" --conns 50 --size 64 --window 16 --duration "$DURATION" $(tls)
      elif [[ $s == 6 ]]; then
        bench_cpu "$tag" $((dur_s + 120)) throughput "$(url)" --conns 50 --size 64 --window 16 --duration "$DURATION" --compressed $(tls)
      else
        bench_cpu "$tag" $((dur_s + 120)) throughput "$(url)" --conns 20 --size 16384 --window 4 --duration "$DURATION" --binary $(tls)
      fi || { stop_all; return 0; }
      local n; n=$(jget "$json" messages)
      result "s$s.msgs" "$(jget "$json" messages_per_second)"
      result "s$s.mbs" "$(jget "$json" megabytes_per_second)"
      if [[ -n $proxy_pid ]] && (( n > 0 )); then
        result "s$s.cpu_us_per_msg" "$(python3 -c "print($cpu_ticks*1e6/$hz/$n)")"
        result "s$s.cpu_pct" "$(python3 -c "print($cpu_ticks/$hz/$wall*100)")"
      fi
      ;;
    3)
      bench_cpu "$tag" $((dur_s + 120)) latency "$(url)" --conns 100 --rate 2000 --duration "$DURATION" $(tls) || { stop_all; return 0; }
      result s3.p50_us "$(jget "$json" p50_us)"
      result s3.p99_us "$(jget "$json" p99_us)"
      result s3.samples "$(jget "$json" samples)"
      [[ -n $proxy_pid ]] && result s3.cpu_pct "$(python3 -c "print($cpu_ticks/$hz/$wall*100)")"
      ;;
    4)
      local before=0 during=0 bpid t0=0 t1=0 start opened_at
      [[ -n $proxy_pid ]] && { before=$(conn_rss_kb); t0=$(ticks); }
      start=$(date +%s.%N)
      taskset -c 0 "$bin" bench idle "$(url)" --conns "$IDLE_CONNS" --hold "$IDLE_HOLD" --parallel "$IDLE_PARALLEL" $(tls) >"$OUT/$tag.log" 2>&1 & bpid=$!; pids+=("$bpid")
      # When every connection is open the generator prints its handshake line and holds; sample
      # the proxy's RSS in the middle of the hold.
      for _ in $(seq 3000); do grep -q '^idle: opened' "$OUT/$tag.log" 2>/dev/null && break; kill -0 "$bpid" 2>/dev/null || break; sleep 0.1; done
      opened_at=$(date +%s.%N)
      [[ -n $proxy_pid ]] && t1=$(ticks)
      sleep $(( idle_hold_s / 2 ))
      [[ -n $proxy_pid ]] && during=$(conn_rss_kb)
      finish_idle "$bpid" "$idle_hold_s" || { stop_all; return 0; }
      local opened; opened=$(jget "$json" opened)
      result s4.handshakes "$(jget "$json" handshakes_per_second)"
      result s4.lost "$(( $(jget "$json" lost) + $(jget "$json" failed) ))"
      if [[ -n $proxy_pid ]] && (( opened > 0 )); then
        result s4.cpu_pct "$(python3 -c "print($((t1 - t0))/$hz/($opened_at-$start)*100)")"
        result s4.rss_before_mib "$(python3 -c "print($before/1024)")"
        result s4.bytes_per_conn "$(python3 -c "print(($during-$before)*1024/$opened)")"
      fi
      ;;
    5)
      local bpid active=0 t0 t1 window rss
      taskset -c 0 "$bin" bench idle "$(url)" --conns "$IDLE_CONNS" --hold "${KEEPALIVE_HOLD}s" --parallel "$IDLE_PARALLEL" $(tls) >"$OUT/$tag.log" 2>&1 & bpid=$!; pids+=("$bpid")
      for _ in $(seq 3000); do
        active=$(curl -fs "http://127.0.0.1:$admin_port/metrics" | awk '/^wskeep_connections_active /{print $2}')
        [[ "${active:-0}" -ge "$IDLE_CONNS" ]] && break
        kill -0 "$bpid" 2>/dev/null || break; sleep 0.2
      done
      window=$(( KEEPALIVE_HOLD / 2 )); t0=0; t1=0; rss=0
      if [[ "${active:-0}" -ge "$IDLE_CONNS" ]]; then
        local spid=
        if [[ $STATUS_PAGE != 0 && $current == wskeep ]]; then
          # Bounded: one request per STATUS_PAGE seconds for the window, then stopped below.
          (for _ in $(seq $(( window / STATUS_PAGE + 1 ))); do
             taskset -c 0 curl -fs -o /dev/null -w '%{size_download} %{time_total}\n' \
               "http://127.0.0.1:$admin_port/status.json" >>"$OUT/$tag.status" || true
             sleep "$STATUS_PAGE"
           done) & spid=$!; pids+=("$spid")
        fi
        t0=$(ticks); sleep "$window"; t1=$(ticks)
        rss=$(rss_kb)
        if [[ -n $spid ]]; then
          stop "$spid"
          result s5.status_bytes "$(sort -n "$OUT/$tag.status" | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]+0}')"
          result s5.status_ms "$(awk '{print $2*1000}' "$OUT/$tag.status" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]+0}')"
        fi
      else
        echo "scenario 5: only ${active:-0} of $IDLE_CONNS connections came up; no CPU figure" >&2
      fi
      finish_idle "$bpid" "$KEEPALIVE_HOLD" || { stop_all; return 0; }
      curl -fs "http://127.0.0.1:$admin_port/metrics" >"$OUT/$tag.metrics" || true
      result s5.lost "$(( $(jget "$json" lost) + $(jget "$json" failed) ))"
      if (( rss > 0 )); then
        result s5.cpu_pct "$(python3 -c "print(($t1-$t0)/$hz/$window*100)")"
        result s5.bytes_per_conn "$(python3 -c "print($rss*1024/$IDLE_CONNS)")"
      fi
      result s5.pings_sent "$(awk '/^wskeep_pings_sent_total/{s+=$2} END{print s+0}' "$OUT/$tag.metrics")"
      ;;
  esac
  stop_all
}

read -r -a plist <<<"$PROXIES"
read -r -a slist <<<"$SCENARIOS"
floor="$OUT/floor"
if [[ -n $need_floor ]]; then
  cc -O2 -o "$floor" tests/bench/floor.c || { echo "compare.sh: cannot build tests/bench/floor.c (cc)" >&2; exit 1; }
fi
: >"$OUT/results.tsv"
t_start=$(date +%s)
log "wskeep $($bin --version 2>/dev/null || echo '?'); $(nginx -v 2>&1 || true); $(haproxy -v 2>/dev/null | head -1 || true)"
log "rounds $ROUNDS, duration $DURATION, scenarios [$SCENARIOS], proxies [$PROXIES], idle connections $IDLE_CONNS, fd limit $nofile; logs in $OUT"
for ((round = 1; round <= ROUNDS; round++)); do
  n=${#plist[@]}; order=()
  for ((i = 0; i < n; i++)); do order+=("${plist[$(( (i + round - 1) % n ))]}"); done
  for current in "${order[@]}"; do
    for s in "${slist[@]}"; do
      [[ $s == 5 && $current != wskeep && $current != direct ]] && continue
      [[ $s == 7 && $current != wskeep ]] && continue
      scenario "$s"
    done
  done
done
elapsed=$(( $(date +%s) - t_start ))

python3 - "$OUT/results.tsv" "$PROXIES" "$ROUNDS" "$DURATION" "$IDLE_CONNS" "$IDLE_HOLD" "$KEEPALIVE_HOLD" "$elapsed" <<'PY' | tee "$OUT/table.txt"
import sys, statistics
path, proxies, rounds, duration, idle, idle_hold, ka_hold, elapsed = sys.argv[1:]
proxies = proxies.split()
vals = {}
for line in open(path):
    r, proxy, key, v = line.rstrip("\n").split("\t")
    vals.setdefault((proxy, key), []).append(float(v))
def med(proxy, key):
    v = vals.get((proxy, key))
    return statistics.median(v) if v else None
rows = [
    ("s1.msgs", "1  64 B text, 50 conns, window 16: msg/s", "higher", "{:.0f}"),
    ("s1.cpu_us_per_msg", "   proxy CPU per echoed message, us", "lower", "{:.2f}"),
    ("s1.cpu_pct", "   proxy CPU, % of one core", "", "{:.0f}"),
    ("s2.msgs", "2  16 KiB binary, 20 conns, window 4: msg/s", "higher", "{:.0f}"),
    ("s2.mbs", "   MB/s (payload, each way)", "higher", "{:.0f}"),
    ("s2.cpu_us_per_msg", "   proxy CPU per echoed message, us", "lower", "{:.1f}"),
    ("s2.cpu_pct", "   proxy CPU, % of one core", "", "{:.0f}"),
    ("s3.p50_us", "3  latency at 2,000 msg/s, 100 conns: p50 us", "lower", "{:.0f}"),
    ("s3.p99_us", "   p99 us", "lower", "{:.0f}"),
    ("s3.cpu_pct", "   proxy CPU, % of one core", "lower", "{:.1f}"),
    ("s4.handshakes", f"4  {idle} idle conns: handshakes/s", "higher", "{:.0f}"),
    ("s4.cpu_pct", "   proxy CPU while opening, % of one core", "", "{:.0f}"),
    ("s4.bytes_per_conn", "   proxy RSS per connection (both legs), B", "lower", "{:.0f}"),
    ("s4.rss_before_mib", "   proxy RSS before, MiB", "", "{:.1f}"),
    ("s4.lost", "   connections lost or failed", "lower", "{:.0f}"),
    ("s5.cpu_pct", f"5  {idle} conns, 1 s pings both legs: CPU %", "lower", "{:.1f}"),
    ("s5.bytes_per_conn", "   RSS per connection (total RSS / conns), B", "lower", "{:.0f}"),
    ("s5.lost", "   connections lost or failed", "lower", "{:.0f}"),
    ("s5.pings_sent", "   pings sent (both legs, whole run)", "", "{:.0f}"),
    ("s6.msgs", "6  as 1, permessage-deflate (Python echo): msg/s", "higher", "{:.0f}"),
    ("s6.cpu_us_per_msg", "   proxy CPU per echoed message, us", "lower", "{:.2f}"),
    ("s6.cpu_pct", "   proxy CPU, % of one core", "", "{:.0f}"),
    ("s7.ordinary_b", "7  resume: RSS per idle connection, ordinary, B", "lower", "{:.0f}"),
    ("s7.attached_b", "   resumable, attached, B", "lower", "{:.0f}"),
    ("s7.detached_b", "   resumable, detached (client gone), B", "lower", "{:.0f}"),
    ("s7.ordinary_us", "   CPU per echoed 64 B message, ordinary, us", "lower", "{:.2f}"),
    ("s7.resumable_us", "   CPU per echoed 64 B message, resumable, us", "lower", "{:.2f}"),
]
cols = proxies + ["wskeep/nginx", "wskeep/haproxy"]
w0 = max(len(r[1]) for r in rows) + 1
print(f"\nmedians of {rounds} round(s); scenarios 1-3 {duration}, scenario 4 hold {idle_hold}, scenario 5 hold {ka_hold}s; "
      f"proxies on CPU 1, load generator and echo upstream on CPU 0; direct = plain ws:// to the echo upstream (no TLS); "
      f"in scenario 5, direct is the kernel floor (tests/bench/floor.c: the same system calls, nothing else)")
print("label".ljust(w0) + "".join(c.rjust(15) for c in cols) + "  better")
for key, label, better, fmt in rows:
    if not any((p, key) in vals for p in proxies):
        continue
    line = label.ljust(w0)
    for p in proxies:
        m = med(p, key)
        line += (fmt.format(m) if m is not None else "-").rjust(15)
    w = med("wskeep", key)
    for other in ("nginx", "haproxy"):
        o = med(other, key)
        line += (f"{w / o:.2f}x" if w is not None and o else "-").rjust(15)
    print(line + "  " + better)
w, f = med("wskeep", "s5.cpu_pct"), med("direct", "s5.cpu_pct")
if w is not None and f is not None:
    print(f"\nscenario 5: wskeep {w:.1f} % of a core, of which {f:.1f} % is the kernel floor (direct): "
          f"about {w - f:.1f} % is wskeep's own work (TLS, framing, timers, scheduling). About: the floor's "
          f"peer is one C process, where wskeep's peers are the load generator and the echo upstream")
print("\nmsg/s and handshakes/s are capped by the load generator (one core, shared with the echo upstream) "
      "whenever the proxy's CPU is well below 100%: then compare CPU per message, not msg/s. Ratios are "
      "wskeep's value divided by the other's; see the 'better' column for the direction.")
h, m = divmod(int(elapsed), 60)
print(f"\nrun took {h}m{m:02d}s; raw logs and results.tsv in {path.rsplit('/', 1)[0]}")
PY

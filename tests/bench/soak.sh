#!/usr/bin/env bash
# Soak: SOAK_CONNS connections through wskeep with 1 s protocol pings on both legs for SOAK_SECONDS,
# SOAK_ACTIVE of them exchanging 64-byte messages (SOAK_RATE messages/s in all, each echoed by the
# upstream) and answering pings, the rest idle (`wskeep bench idle`). Reports unexpected closes
# (connections the clients lost, and wskeep's connection ends other than client_close), wskeep's
# resident memory when every connection is up, at the end of the hold and after every connection
# closed, and its CPU over the hold. Finishes by itself; exits 1 if any connection ended
# unexpectedly. Not a CI test.
#
#   tests/bench/soak.sh [BIN]
#   SOAK_SECONDS [600]  SOAK_CONNS [9000]  SOAK_ACTIVE [300]  SOAK_RATE [300]  SOAK_TLS [0]
#   SOAK_CLIENT_TIMEOUT [10s]: wskeep's client_keepalive.timeout. `bench idle` answers pings only
#   once all its connections are open (about 4 s for 8,700 plain connections here), so 5 s is tight.
#   OUT [target/bench-soak-DATE]: logs, RSS samples (rss.tsv) and the final metrics are kept there
#
# wskeep runs on CPU 1; the load generators and the echo upstream on CPU 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:-target/release/wskeep}")
SOAK_SECONDS=${SOAK_SECONDS:-600}
SOAK_CONNS=${SOAK_CONNS:-9000}
SOAK_ACTIVE=${SOAK_ACTIVE:-300}
SOAK_RATE=${SOAK_RATE:-300}
SOAK_TLS=${SOAK_TLS:-0}
SOAK_CLIENT_TIMEOUT=${SOAK_CLIENT_TIMEOUT:-10s}
OUT=${OUT:-target/bench-soak-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"; OUT=$(realpath "$OUT")
idle_conns=$((SOAK_CONNS - SOAK_ACTIVE))
(( idle_conns > 0 )) || { echo "soak.sh: SOAK_ACTIVE must be below SOAK_CONNS" >&2; exit 1; }
[[ -x "$bin" ]] || { echo "soak.sh: $bin not found (cargo build --release --locked)" >&2; exit 1; }

ulimit -n "$(ulimit -Hn)"
hz=$(getconf CLK_TCK)
source tests/bench/lib.sh
log() { echo "[$(date +%T)] $*" >&2; }
up=$(free_port); port=$(free_port); admin=$(free_port)
metrics() { curl -fs --max-time 5 "http://127.0.0.1:$admin/metrics"; }
active() { metrics | awk '/^wskeep_connections_active /{print $2}'; }

scheme=ws; insecure=; tls_conf=
if [[ $SOAK_TLS == 1 ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
  scheme=wss; insecure=--insecure
  tls_conf="tls_cert = \"$dir/cert.pem\""$'\n'"tls_key = \"$dir/key.pem\""
fi

taskset -c 0 "$bin" bench echo --listen "127.0.0.1:$up" >"$OUT/echo.log" 2>&1 & pids+=($!)
cat >"$dir/wskeep.toml" <<TOML
[listen]
addr = "127.0.0.1:$port"
$tls_conf
max_connections = $((SOAK_CONNS + 200))
[admin]
addr = "127.0.0.1:$admin"
[upstream]
url = "ws://127.0.0.1:$up"
[client_keepalive]
ping_interval = "1s"
timeout = "$SOAK_CLIENT_TIMEOUT"
[upstream_keepalive]
ping_interval = "1s"
timeout = "5s"
[shutdown]
drain_timeout = "1s"
[log]
level = "warn"
TOML
cp "$dir/wskeep.toml" "$OUT/wskeep.toml"
taskset -c 1 "$bin" run --config "$dir/wskeep.toml" >"$OUT/wskeep.log" 2>&1 & wpid=$!; pids+=("$wpid")
ready=
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && { ready=1; break; }; sleep 0.1; done
[[ -n $ready ]] || { echo "wskeep did not become ready:" >&2; tail -20 "$OUT/wskeep.log" >&2; exit 1; }

rss() { awk '/^VmRSS/{print $2}' "/proc/$wpid/status"; }
ticks() { awk '{print $14+$15}' "/proc/$wpid/stat"; }
rss_idle=$(rss)
url="$scheme://127.0.0.1:$port/"
log "soak: $SOAK_CONNS connections ($SOAK_ACTIVE active at $SOAK_RATE msg/s), 1 s pings both legs, ${SOAK_SECONDS}s; logs in $OUT"
taskset -c 0 "$bin" bench idle "$url" --conns "$idle_conns" --hold "${SOAK_SECONDS}s" --parallel 128 $insecure \
  >"$OUT/idle.log" 2>&1 & ipid=$!; pids+=("$ipid")
taskset -c 0 python3 tests/bench/soak_client.py "$url" --conns "$SOAK_ACTIVE" --rate "$SOAK_RATE" --duration "$SOAK_SECONDS" $insecure \
  >"$OUT/active.log" 2>&1 & apid=$!; pids+=("$apid")

# Wait (bounded) until every connection is up: that is the start of the measured window.
all_up=
for _ in $(seq 1500); do
  a=$(active || echo 0); [[ "${a:-0}" -ge "$SOAK_CONNS" ]] && { all_up=1; break; }
  kill -0 "$ipid" 2>/dev/null || break; sleep 0.2
done
[[ -n $all_up ]] || log "warning: only ${a:-0} of $SOAK_CONNS connections came up"
cpu_busy() { awk -v c="cpu$1" '$1==c {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
t_start=$(date +%s.%N); k_start=$(ticks); rss_start=$(rss); c0_start=$(cpu_busy 0); c1_start=$(cpu_busy 1)
log "all up: $a connections, RSS $((rss_start / 1024)) MiB"

# Sample every 5 s while both generators hold their connections; the last sample with every
# connection still open is "the end". Bounded: the generators stop by themselves after SOAK_SECONDS.
printf 'seconds\tactive\trss_kb\tcpu_ticks\n' >"$OUT/rss.tsv"
t_end=$t_start; k_end=$k_start; rss_end=$rss_start; rss_max=$rss_start; c0_end=$c0_start; c1_end=$c1_start
deadline=$(( $(date +%s) + SOAK_SECONDS + 180 ))
while kill -0 "$ipid" 2>/dev/null || kill -0 "$apid" 2>/dev/null; do
  (( $(date +%s) < deadline )) || { log "generators did not finish in time"; break; }
  sleep 5
  a=$(active || echo 0); r=$(rss); k=$(ticks); now=$(date +%s.%N)
  printf '%.0f\t%s\t%s\t%s\n' "$(python3 -c "print($now-$t_start)")" "$a" "$r" "$k" >>"$OUT/rss.tsv"
  (( r > rss_max )) && rss_max=$r
  if [[ "${a:-0}" -ge "$SOAK_CONNS" ]]; then t_end=$now; k_end=$k; rss_end=$r; c0_end=$(cpu_busy 0); c1_end=$(cpu_busy 1); fi
done
rc_idle=0; wait "$ipid" || rc_idle=$?
rc_active=0; wait "$apid" || rc_active=$?
# Every connection closed (bounded), then wskeep's account of how each one ended.
for _ in $(seq 150); do [[ "$(active || echo 0)" == 0 ]] && break; sleep 0.2; done
sleep 1
rss_after=$(rss)
metrics >"$OUT/metrics.txt"
kill -TERM "$wpid" 2>/dev/null || true
for _ in $(seq 100); do kill -0 "$wpid" 2>/dev/null || break; sleep 0.1; done

python3 - "$OUT" "$SOAK_CONNS" "$SOAK_SECONDS" "$hz" "$t_start" "$t_end" "$k_start" "$k_end" \
  "$rss_idle" "$rss_start" "$rss_end" "$rss_max" "$rss_after" "$rc_idle" "$rc_active" \
  "$c0_start" "$c0_end" "$c1_start" "$c1_end" <<'PY' | tee "$OUT/summary.txt"
import json, re, sys
out, conns, secs, hz, t0, t1, k0, k1, rss_idle, rss0, rss1, rss_max, rss_after, rc_idle, rc_active = sys.argv[1:16]
def busy(a, b):
    (b0, t0_), (b1, t1_) = map(int, a.split()), map(int, b.split())
    return (b1 - b0) / (t1_ - t0_) * 100 if t1_ > t0_ else float("nan")
cpu0, cpu1 = busy(sys.argv[16], sys.argv[17]), busy(sys.argv[18], sys.argv[19])
conns, hz = int(conns), int(hz)
def last_json(path):
    try:
        return json.loads(open(path).read().strip().splitlines()[-1])
    except Exception:
        return {}
idle, active = last_json(f"{out}/idle.log"), last_json(f"{out}/active.log")
ends, closes, pings, msgs = {}, {}, {}, {}
for line in open(f"{out}/metrics.txt"):
    m = re.match(r'wskeep_connection_duration_seconds_count\{end="([^"]+)"\} (\S+)', line)
    if m: ends[m[1]] = ends.get(m[1], 0) + int(float(m[2]))
    m = re.match(r'wskeep_close_codes_total\{(.*)\} (\S+)', line)
    if m and float(m[2]) > 0: closes[m[1]] = int(float(m[2]))
    m = re.match(r'wskeep_(pings_sent|pongs_received|pings_answered)_total\{side="([^"]+)"\} (\S+)', line)
    if m: pings[f"{m[1]}.{m[2]}"] = int(float(m[3]))
    m = re.match(r'wskeep_messages_total\{direction="([^"]+)"\} (\S+)', line)
    if m: msgs[m[1]] = int(float(m[2]))
window = float(t1) - float(t0)
cpu = (int(k1) - int(k0)) / hz / window * 100 if window > 0 else float("nan")
unexpected_ends = {k: v for k, v in ends.items() if k != "client_close" and v}
lost = idle.get("lost", 0) + idle.get("failed", 0) + active.get("lost", 0) + active.get("failed", 0)
mib = lambda kb: int(kb) / 1024
print(f"soak: {conns} connections for {secs}s, 1 s pings on both legs")
print(f"  idle generator:   {idle.get('opened', '?')} opened, {idle.get('lost', '?')} lost, {idle.get('failed', '?')} failed, "
      f"{idle.get('pings_answered', '?')} pings answered, {idle.get('handshakes_per_second', 0):.0f} handshakes/s (exit {rc_idle})")
print(f"  active generator: {active.get('conns', '?')} conns, {active.get('sent', '?')} sent, {active.get('echoed', '?')} echoed, "
      f"{active.get('missing', '?')} missing, {active.get('lost', '?')} lost {active.get('lost_by', {})}, {active.get('failed', '?')} failed, "
      f"RTT p50 {active.get('p50_us', '?')}us p99 {active.get('p99_us', '?')}us max {active.get('max_us', '?')}us (exit {rc_active})")
print(f"  wskeep ends: {ends}; unexpected (not client_close): {sum(unexpected_ends.values())} {unexpected_ends}")
print(f"  wskeep close codes: {closes}")
print(f"  wskeep pings: {pings}; messages: {msgs}")
print(f"  wskeep RSS: {mib(rss_idle):.1f} MiB before connections, {mib(rss0):.1f} MiB all up, {mib(rss1):.1f} MiB at the end of the hold "
      f"(max {mib(rss_max):.1f}), {mib(rss_after):.1f} MiB after every connection closed; "
      f"{(int(rss1) - int(rss_idle)) * 1024 / conns:.0f} B per connection at the end")
print(f"  wskeep CPU: {cpu:.1f}% of one core over {window:.0f}s with every connection up; "
      f"machine: CPU 0 (generators, echo) {cpu0:.0f}% busy, CPU 1 (wskeep) {cpu1:.0f}% busy "
      f"(anything above wskeep's share on CPU 1, or CPU 0 near 100%, is other load and inflates RTTs)")
ok = lost == 0 and not unexpected_ends and active.get("missing", 1) == 0 and int(rc_idle) == 0 and int(rc_active) == 0
print(json.dumps({"conns": conns, "seconds": float(secs), "lost": lost, "unexpected_ends": unexpected_ends,
                  "missing_echoes": active.get("missing"), "rss_kb": {"idle": int(rss_idle), "start": int(rss0), "end": int(rss1),
                  "max": int(rss_max), "after": int(rss_after)}, "cpu_percent": round(cpu, 2), "cpu0_busy": round(cpu0, 1), "cpu1_busy": round(cpu1, 1), "window_seconds": round(window, 1),
                  "ok": ok}))
sys.exit(0 if ok else 1)
PY

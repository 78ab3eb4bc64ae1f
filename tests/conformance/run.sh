#!/usr/bin/env bash
# WebSocket conformance: the Autobahn|Testsuite cases, run by kosoku (PyPI) in
# fuzzingclient mode, against wskeep in front of an echo upstream
# (`wskeep bench echo`).
#
#   tests/conformance/run.sh [WSKEEP_BINARY]        # default target/release/wskeep
#   UPSTREAM_PING=50ms tests/conformance/run.sh     # with keepalive pings on the upstream leg
#   UPSTREAM=websockets CASES="12.* 13.*" tests/conformance/run.sh   # compression, end to end
#
# Environment:
#   UPSTREAM             the echo upstream: "wskeep" (`wskeep bench echo`, no extension; default) or
#                        "websockets" (Python websockets with its default permessage-deflate,
#                        tests/compression/peers.py: the compression cases 12.* and 13.* run
#                        end to end through wskeep's pass-through)
#   DIRECT               1: kosoku talks to the echo upstream itself, without wskeep (the
#                        reference counts the README compares with)
#   UPSTREAM_PING        upstream_keepalive.ping_interval for wskeep (default 0s: off)
#   CASES                space-separated case ids or globs to run (default: the whole suite)
#   EXCLUDE              space-separated case ids or globs to leave out
#   KOSOKU               kosoku executable (default: the one tests/conformance/install.sh installs)
#   KOSOKU_PARALLELISM   cases run at once (default 1)
#   KOSOKU_TIMEOUT       seconds the whole suite may take (default 900)
#   CONFORMANCE_OUT      output directory (default target/conformance/upstream_ping_$UPSTREAM_PING)
#
# The output directory keeps the wskeep config, the logs of wskeep, the echo
# upstream and kosoku, kosoku's Autobahn-format report (reports/index.html,
# reports/index.json and one file per case) and non_ok.tsv.
#
# Exits non-zero when a case FAILED (see summarize.py for the exact rule), when
# the report is missing or incomplete, when wskeep or the echo upstream died or
# panicked during the run, when wskeep still holds proxied connections 10 s
# after the suite ended, or when UPSTREAM_PING is set and wskeep's metrics show
# no ping sent upstream.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

if [[ $# -ge 1 ]]; then
    BIN=$1
    [[ "$BIN" == /* ]] || BIN="$PWD/$BIN"
else
    BIN="$root/target/release/wskeep"
fi
[[ -x "$BIN" ]] || { echo "run.sh: wskeep binary not found or not executable: $BIN" >&2; exit 2; }

UPSTREAM_PING=${UPSTREAM_PING:-0s}
UPSTREAM=${UPSTREAM:-wskeep}
DIRECT=${DIRECT:-0}
KOSOKU_PARALLELISM=${KOSOKU_PARALLELISM:-1}
KOSOKU_TIMEOUT=${KOSOKU_TIMEOUT:-900}
suffix=$UPSTREAM
[[ "$DIRECT" == 1 ]] && suffix+=_direct
OUT=${CONFORMANCE_OUT:-$root/target/conformance/${suffix}_upstream_ping_$UPSTREAM_PING}

if [[ -z "${KOSOKU:-}" ]]; then
    KOSOKU=$("$here/install.sh" | tail -n1)
fi
[[ -x "$KOSOKU" ]] || { echo "run.sh: kosoku not found at '$KOSOKU'" >&2; exit 2; }

rm -rf "$OUT"
mkdir -p "$OUT"

# --- processes we start, and only those, are stopped on exit -----------------
pids=()
stop_pid() { # PID: TERM, up to 5 s to exit, then KILL; reap it and forget it
    local pid=$1 i p rest=()
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${pids[@]}"; do [[ "$p" == "$pid" ]] || rest+=("$p"); done
    pids=("${rest[@]}")
}
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do stop_pid "$pid"; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log_tail() { # FILE: show the end of a log
    echo "---- last lines of $1 ----" >&2
    tail -n 40 "$1" >&2 || true
    echo "----" >&2
}

http_status() { # URL -> prints the HTTP status, or 000 when nothing answered
    python3 - "$1" <<'EOF'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}

pick_ports() { # prints 3 distinct free loopback ports, below the ephemeral range when it can
    python3 - <<'EOF'
import random, socket
try:
    lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    lo = 32768
candidates = list(range(10000, lo)) if lo > 11000 else []
random.shuffle(candidates)
socks = []
for port in candidates[:200]:
    if len(socks) == 3:
        break
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        socks.append(s)
    except OSError:
        s.close()
while len(socks) < 3:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*(s.getsockname()[1] for s in socks))
EOF
}

# Each start_* returns 0 when the process is ready, 2 when it could not bind
# its port (another process took it meanwhile: pick new ports and try again),
# 1 on any other failure.
start_echo() {
    if [[ "$UPSTREAM" == websockets ]]; then
        "$root/tests/networks/install.sh" >&2
        "${XDG_CACHE_HOME:-$HOME/.cache}/wskeep/websockets-venv/bin/python" \
            "$root/tests/compression/peers.py" upstream "$UP" >"$OUT/echo.log" 2>&1 &
    else
        "$BIN" bench echo --listen "127.0.0.1:$UP" >"$OUT/echo.log" 2>&1 &
    fi
    ECHO_PID=$!
    pids+=("$ECHO_PID")
    local deadline=$((SECONDS + 30))
    until grep -qE "listening|ready" "$OUT/echo.log" 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$UP") 2>/dev/null; do
        if ! kill -0 "$ECHO_PID" 2>/dev/null; then
            grep -qi "in use" "$OUT/echo.log" && return 2
            echo "run.sh: echo upstream exited before listening" >&2; log_tail "$OUT/echo.log"; return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "run.sh: echo upstream not listening on 127.0.0.1:$UP after 30 s" >&2; log_tail "$OUT/echo.log"; return 1
        fi
        sleep 0.1
    done
}

start_wskeep() {
    cat >"$OUT/wskeep.toml" <<EOF
[listen]
addr = "127.0.0.1:$PORT"

[upstream]
url = "ws://127.0.0.1:$UP"

[client_keepalive]
ping_interval = "0s"
timeout = "0s"

[upstream_keepalive]
ping_interval = "$UPSTREAM_PING"

[limits]
max_message_size = "16MiB"

[admin]
addr = "127.0.0.1:$ADMIN"

[log]
level = "warn"
EOF
    "$BIN" run --config "$OUT/wskeep.toml" >"$OUT/wskeep.log" 2>&1 &
    WSKEEP_PID=$!
    pids+=("$WSKEEP_PID")
    local deadline=$((SECONDS + 30))
    until [[ "$(http_status "http://127.0.0.1:$ADMIN/readyz")" == 200 ]]; do
        if ! kill -0 "$WSKEEP_PID" 2>/dev/null; then
            grep -qi "in use" "$OUT/wskeep.log" && return 2
            echo "run.sh: wskeep exited before it was ready" >&2; log_tail "$OUT/wskeep.log"; return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "run.sh: wskeep /readyz not 200 after 30 s" >&2; log_tail "$OUT/wskeep.log"; return 1
        fi
        sleep 0.1
    done
}

for attempt in 1 2 3 4 5; do
    read -r PORT UP ADMIN < <(pick_ports)
    rc=0; start_echo || rc=$?
    if ((rc == 0)); then
        rc=0; start_wskeep || rc=$?
        ((rc == 0)) && break
        stop_pid "$WSKEEP_PID"
    fi
    stop_pid "$ECHO_PID"
    ((rc == 1)) && exit 1
    echo "run.sh: a port was taken meanwhile (attempt $attempt), picking new ports" >&2
    ((attempt == 5)) && { echo "run.sh: could not bind free ports in 5 attempts" >&2; exit 1; }
done

# --- the suite -----------------------------------------------------------------------
select_args=()
read -r -a include <<<"${CASES:-}"    # read -a: no glob expansion of "9.*"
read -r -a exclude <<<"${EXCLUDE:-}"
for c in "${include[@]}"; do select_args+=(-i "$c"); done
for c in "${exclude[@]}"; do select_args+=(-x "$c"); done
expect=1
if [[ -z "${CASES:-}${EXCLUDE:-}" ]]; then
    # the whole suite: every case kosoku has must be in the report
    expect=$("$(dirname "$KOSOKU")/python" -c 'from kosoku.cases import CASES; print(len(CASES))' 2>/dev/null || echo 1)
fi

target=$PORT path="ws://127.0.0.1:$PORT (wskeep) -> ws://127.0.0.1:$UP ($UPSTREAM echo)"
if [[ "$DIRECT" == 1 ]]; then
    target=$UP path="ws://127.0.0.1:$UP ($UPSTREAM echo, directly)"
fi
echo "conformance: kosoku $("$(dirname "$KOSOKU")/python" -c 'import importlib.metadata as m; print(m.version("kosoku"))' 2>/dev/null || echo '?')" \
     "-> $path;" \
     "max_message_size 16MiB, upstream ping_interval $UPSTREAM_PING, parallelism $KOSOKU_PARALLELISM"
started=$SECONDS
set +e
timeout --kill-after=10 "$KOSOKU_TIMEOUT" \
    "$KOSOKU" --mode fuzzingclient --parallelism "$KOSOKU_PARALLELISM" --outdir "$OUT/reports" \
    "${select_args[@]}" "ws://127.0.0.1:$target" >"$OUT/kosoku.log" 2>&1
krc=$?
set -e
echo "conformance: suite ran in $((SECONDS - started)) s (kosoku exit $krc; it exits 1 whenever a case is not OK/NON-STRICT/INFORMATIONAL, UNIMPLEMENTED included)"

problems=()
if ((krc == 124 || krc == 137)); then
    problems+=("kosoku did not finish within $KOSOKU_TIMEOUT s")
elif ((krc != 0 && krc != 1)); then
    problems+=("kosoku exited with status $krc")
fi
if ((krc != 0)) && [[ ! -f "$OUT/reports/index.json" ]]; then
    log_tail "$OUT/kosoku.log"
fi

# --- wskeep must have survived, and let go of every connection ------------------------
if ! kill -0 "$WSKEEP_PID" 2>/dev/null; then
    problems+=("wskeep exited during the suite")
    log_tail "$OUT/wskeep.log"
else
    metrics() { # prints: connections_active connections_total upstream_pings_sent upstream_pongs_received
        python3 - "http://127.0.0.1:$ADMIN/metrics" <<'EOF'
import sys, urllib.request
try:
    text = urllib.request.urlopen(sys.argv[1], timeout=2).read().decode()
except Exception:
    print("unreachable"); sys.exit()
values = {}
for line in text.splitlines():
    if line and not line.startswith("#"):
        name, _, value = line.rpartition(" ")
        values[name] = value
def get(name):
    v = values.get(name)
    return "absent" if v is None else str(int(float(v)))
print(get("wskeep_connections_active"), get("wskeep_connections_total"),
      get('wskeep_pings_sent_total{side="upstream"}'),
      get('wskeep_pongs_received_total{side="upstream"}'))
EOF
    }
    deadline=$((SECONDS + 10))
    while :; do
        read -r active total pings pongs < <(metrics)
        [[ "$active" == 0 || "$active" == absent || "$active" == unreachable ]] && break
        ((SECONDS >= deadline)) && break
        sleep 0.2
    done
    echo "conformance: wskeep metrics after the suite: connections_total=${total:-?}" \
         "connections_active=$active upstream pings_sent=${pings:-?} pongs_received=${pongs:-?}"
    case "$active" in
        0) ;;
        absent) echo "conformance: note: /metrics has no wskeep_connections_active, connection leak check skipped" ;;
        unreachable) problems+=("wskeep /metrics unreachable after the suite") ;;
        *) problems+=("wskeep still reports $active active connections 10 s after the suite ended") ;;
    esac
    if [[ "$UPSTREAM_PING" != 0s && "$UPSTREAM_PING" != 0 && "${pings:-}" == 0 ]]; then
        problems+=("upstream_keepalive.ping_interval = $UPSTREAM_PING, yet wskeep sent no ping upstream")
    fi
fi
if ! kill -0 "$ECHO_PID" 2>/dev/null; then
    problems+=("the echo upstream exited during the suite")
    log_tail "$OUT/echo.log"
fi
if grep -q "panicked at" "$OUT/wskeep.log" "$OUT/echo.log" 2>/dev/null; then
    problems+=("a panic was logged (see $OUT/wskeep.log, $OUT/echo.log)")
    grep -h -A3 "panicked at" "$OUT/wskeep.log" "$OUT/echo.log" >&2 || true
fi

# --- report --------------------------------------------------------------------------
echo "conformance: report in $OUT/reports/index.html"
echo
set +e
python3 "$here/summarize.py" "$OUT/reports" --expect-cases "$expect" | tee "$OUT/summary.txt"
src=${PIPESTATUS[0]}
set -e

for p in "${problems[@]}"; do
    echo "conformance: ERROR: $p" >&2
done
if ((src != 0)) || ((${#problems[@]} > 0)); then
    exit 1
fi
